"""Atomic writes and safe reads: nothing half-written ever sits under a final name.

Every file is written to a temp file `.<name>.<random>.tmp` beside it and renamed; the result has
the permissions the umask gives a new file. A folder is written into a marked temp folder beside
it (`atomic_dir`) and swapped in so that a kill at any moment loses neither the folder that was
there nor the finished new one (see `atomic_dir`). A kill mid-write leaves only such temps, which
`remove_stale_temps` clears, finishes or restores on the next run; it deletes only temp files and
temp folders that carry our marker, never anything else. A failed write (a full disk) is one
`InputError` naming the file. Torch files carry a SHA-256 of their payload (`payload_digest`),
checked on load, so a corrupted checkpoint is refused with its name.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from msvlad.errors import CheckpointError, InputError
from msvlad.paths import MANIFEST

log = logging.getLogger(__name__)

DIGEST_KEY = "sha256"  # the key of a torch file's payload checksum
TEMP_MARK = ".msvlad-temp.json"  # inside every temp folder of `atomic_dir`: proof that it is ours
# MANIFEST, what made a results folder: the command, its inputs, and every file of the folder
# ("files") with its sha256 ("sha256"); evaluate refuses to replace a folder holding anything it
# does not list


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A failed write of the temp file (a full disk, a read-only folder) is an `InputError` naming
    `path`; the temp file never outlives the block.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise write_error(path, err) from None
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as err:
            if err.filename not in (None, tmp, str(tmp_path)):
                raise  # about another file: its own name says it
            raise write_error(path, err) from None
        try:
            os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp makes 0600; honour the umask
            os.replace(tmp_path, path)
        except OSError as err:
            raise write_error(path, err) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_error(path: str | os.PathLike, err: OSError) -> InputError:
    """The one-line error of a failed write: the file it was for and what the system said."""
    what = err.strerror or str(err) or type(err).__name__
    hint = " (free some space)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return InputError(f"{path}: cannot write: {what}{hint}")


def umask() -> int:
    """The process umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The states a temp folder of `atomic_dir` records in its marker (TEMP_MARK), and what
# `remove_stale_temps` does with one a kill left behind:
#   writing   new content being written into BOX/new               -> deleted (never finished)
#   complete  BOX/new finished, about to replace the folder         -> put in place (rolled forward)
#   previous  BOX/old is the folder that was in place before        -> restored if nothing is in
#                                                                      place, else kept (a warning)
BOX_STATES = ("writing", "complete", "previous")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh folder to fill; when the block succeeds it replaces `path` as a whole.

    The folder lives in a marked temp folder beside `path` (`.<name>.<random>.tmp/new`). The swap
    marks it complete, moves the folder in place (if any) into a marked `.<name>.<random>.old/`,
    renames the new one in and only then deletes the old one, so a kill at any moment leaves
    either folder recoverable, and `remove_stale_temps` on the next run finishes the swap. A
    failure in the block leaves `path` untouched and removes the temp folder (this run's own); the
    new folder gets the permissions the umask gives a new directory.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        box = _new_box(path, ".tmp", "writing")
        (box / "new").mkdir()
    except OSError as err:
        raise write_error(path, err) from None
    try:
        yield box / "new"
        _swap(path, box)
    finally:
        _discard(box)


def _new_box(path: Path, suffix: str, state: str) -> Path:
    """A fresh temp folder beside `path`, marked as ours (for `path.name`, in `state`)."""
    box = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    try:
        _mark(box, path.name, state)
    except OSError:
        shutil.rmtree(box, ignore_errors=True)  # just made, empty but for a partial marker
        raise
    return box


def _mark(box: Path, name: str, state: str) -> None:
    """Write (or atomically rewrite) the marker of a temp folder of ours."""
    mark = {"for": name, "state": state, "pid": os.getpid(), "time": time.time()}
    part = box / f"{TEMP_MARK}.part"
    part.write_text(json.dumps(mark) + "\n")
    os.replace(part, box / TEMP_MARK)


def _read_mark(box: Path) -> dict[str, Any] | None:
    """The marker of a temp folder of ours; None when it has none (then it is not ours)."""
    mark = box / TEMP_MARK
    if box.is_symlink() or mark.is_symlink() or not mark.is_file():
        return None
    try:
        data = json.loads(mark.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("state") not in BOX_STATES:
        return None
    name = data.get("for")
    ours = isinstance(name, str) and "/" not in name and name not in ("", ".", "..")
    return data if ours and box.name.startswith(f".{name}.") else None


def _swap(path: Path, box: Path) -> None:
    """Put BOX/new at `path`; the folder there goes to a marked `.old` box, deleted last."""
    old_box = None
    try:
        _mark(box, path.name, "complete")
        if os.path.lexists(path):
            old_box = _new_box(path, ".old", "previous")
            os.replace(path, old_box / "old")
        os.replace(box / "new", path)
    except OSError as err:
        if old_box is not None and (old_box / "old").exists() and not os.path.lexists(path):
            try:  # put the previous folder back at once (else the next run restores it)
                os.replace(old_box / "old", path)
            except OSError:
                raise write_error(path, err) from None
        with contextlib.suppress(OSError):  # not to be put in place by a later run
            _mark(box, path.name, "writing")
        if old_box is not None and not (old_box / "old").exists():
            _discard(old_box)
        raise write_error(path, err) from None
    if old_box is not None:
        _discard(old_box)


def _discard(box: Path) -> None:
    """Delete a temp folder of ours; its content is first renamed out of the names the marker
    speaks of (new/, old/), so a kill mid-delete never leaves a half folder that looks whole."""
    if not box.is_dir():
        return
    for kept in ("new", "old"):
        if (box / kept).exists() or (box / kept).is_symlink():
            os.replace(box / kept, Path(tempfile.mkdtemp(prefix="gone.", dir=box)) / kept)
    for child in box.iterdir():
        if child.name != TEMP_MARK:
            _remove(child)
    (box / TEMP_MARK).unlink(missing_ok=True)
    box.rmdir()


def _remove(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically (a failed write is an `InputError` naming `path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically (UTF-8)."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically, pretty-printed and key-sorted so diffs stay readable."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file with an error that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None


def read_manifest(folder: str | os.PathLike, command: str) -> dict[str, Any]:
    """The MANIFEST of a results folder written by `command`; InputError naming it otherwise."""
    path = Path(folder) / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise InputError(f"{path}: not found (a results folder of msvlad {command} has one)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not readable ({type(err).__name__})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("command") != command
        or not isinstance(files, list)
        or not all(isinstance(f, str) for f in files)
    ):
        raise InputError(f"{path}: not a manifest of msvlad {command} (no list of its files)")
    return data


def torch_bytes(obj: Any) -> bytes:
    """torch.save to bytes; a dict gets the digest of its payload under DIGEST_KEY."""
    import torch  # lazy: notebooks that only read JSON/CSV should not pay for importing torch

    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != DIGEST_KEY}
        obj[DIGEST_KEY] = payload_digest(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save atomically (checkpoints survive a kill mid-write), with the payload digest."""
    return write_bytes(path, torch_bytes(obj))


def first_sentence(err: BaseException, limit: int = 240) -> str:
    """An exception's message up to its first sentence end, cut on a word at `limit` characters
    (a library's long explanation stays readable in a one-line error)."""
    text = " ".join(str(err).split())
    end = re.search(r"(?<=[.!?])\s", text)
    text = text[: end.start()] if end else text
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + "…"


def load_torch(
    path: str | os.PathLike, map_location: Any = "cpu", *, require_digest: bool = False
) -> Any:
    """torch.load restricted to tensors and plain containers (weights_only=True), digest checked.

    A file without a digest loads as it is, unless `require_digest` (model and checkpoint files:
    one without its digest cannot be verified, so it is refused).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only=True refuses
        raise CheckpointError(
            f"{path}: cannot load checkpoint: not tensors and plain containers only, refused by "
            f"torch.load(weights_only=True) ({first_sentence(err)})"
        ) from None
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(
            f"{path}: cannot load checkpoint, damaged, truncated or not a torch file "
            f"({type(err).__name__}: {first_sentence(err)})"
        ) from None
    if require_digest and not (isinstance(obj, dict) and DIGEST_KEY in obj):
        raise CheckpointError(
            f"{path}: not a msvlad model or checkpoint file: no {DIGEST_KEY} checksum to verify "
            "it by (written or edited outside msvlad); re-create it"
        )
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        if payload_digest(obj) != obj[DIGEST_KEY]:
            raise CheckpointError(
                f"{path}: checksum mismatch: the file is corrupt (its {DIGEST_KEY} does not match "
                "its content); restore it or re-create it"
            )
    return obj


def payload_digest(obj: Any) -> str:
    """SHA-256 of a nested structure of tensors, arrays and plain values (the digest key left out).

    Tensors are hashed by dtype, shape and raw bytes, so the digest does not depend on the device
    they were loaded to nor on how torch lays out its zip file.
    """
    h = hashlib.sha256()
    _digest_into(h, obj, top=True)
    return h.hexdigest()


def _digest_into(h: Any, obj: Any, top: bool = False) -> None:
    import torch

    if isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            if top and key == DIGEST_KEY:
                continue
            h.update(repr(key).encode() + b":")
            _digest_into(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, list | tuple):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for item in obj:
            _digest_into(h, item)
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    else:
        h.update(f"{type(obj).__name__}={obj!r};".encode())


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove a file can be written in it (before long work)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise InputError(f"{folder}: exists and is not a folder") from None
    except OSError as err:
        raise InputError(f"{folder}: cannot write here ({err.strerror or err})") from None
    return folder


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Clear what interrupted atomic writes left in `folder` (for `name`, or for every name).

    Temp files `.<name>.<random>.tmp` are deleted. A temp folder of `atomic_dir` is handled by the
    state its marker records (`BOX_STATES`): a finished new folder is put in place, a folder set
    aside by a swap is restored when nothing took its place (and kept, with a warning, when
    something did), an unfinished one is deleted. A folder without our marker is never deleted
    (only an empty one is removed). Returns the temps removed.
    """
    folder = Path(folder)
    stem = "*" if name is None else glob.escape(name)
    removed: list[Path] = []
    boxes: list[tuple[float, Path, dict[str, Any]]] = []
    for pattern in (f".{stem}.*.tmp", f".{stem}.*.old"):
        for p in map(Path, glob.glob(os.path.join(glob.escape(str(folder)), pattern))):
            if p.is_symlink() or not p.is_dir():
                if pattern.endswith(".tmp") and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)  # a temp file of `atomic_path`
                    removed.append(p)
                continue
            mark = _read_mark(p)
            if mark is not None and (name is None or mark["for"] == name):
                boxes.append((float(mark.get("time", 0.0)), p, mark))
            elif mark is None and not any(p.iterdir()):
                p.rmdir()  # empty: nothing to lose
                removed.append(p)
            elif mark is None:
                log.info("%s: not a temp folder of msvlad (no %s), left as it is", p, TEMP_MARK)
    for _, box, mark in sorted(boxes, key=lambda b: (b[0], str(b[1]))):
        target = folder / mark["for"]
        try:
            if mark["state"] == "complete" and (box / "new").is_dir():
                if os.path.lexists(target):  # the folder in place is kept beside, not deleted
                    keep = _new_box(target, ".old", "previous")
                    os.replace(target, keep / "old")
                os.replace(box / "new", target)
                log.warning("%s: put in place, finished by an interrupted run (%s)", target, box)
            elif mark["state"] == "previous" and (box / "old").is_dir():
                if os.path.lexists(target):
                    continue  # kept (a warning below)
                os.replace(box / "old", target)
                log.warning("%s: restored, set aside by an interrupted run (%s)", target, box)
            _discard(box)
        except OSError as err:
            raise write_error(target, err) from None
        removed.append(box)
    for p in map(Path, glob.glob(os.path.join(glob.escape(str(folder)), f".{stem}.*.old"))):
        mark = _read_mark(p) if p.is_dir() else None
        if mark is not None and (name is None or mark["for"] == name):
            log.warning(
                "%s: the earlier content of %s, set aside by an interrupted run, is kept there; "
                "delete it when you no longer need it",
                p / "old",
                folder / mark["for"],
            )
    return removed


@contextmanager
def lock_beside(path: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold `.<name>.lock` beside `path` for the block: a second writer of `path` is refused.

    Beside, not inside, because `path` itself is replaced as a whole. The holder removes the lock
    file when done (a killed holder's file is harmless: the system drops its lock); a lock taken
    on a file that was removed meanwhile is taken again on the new one.
    """
    import fcntl

    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise InputError(f"{lock}: a symbolic link where the lock file goes") from None
            raise write_error(lock, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(
                f"{path}: another msvlad {command} is writing there (it holds {lock}); "
                "wait for it to finish or choose another --out"
            ) from None
        held = os.fstat(fd)
        try:
            now = os.lstat(lock)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # its last holder removed it meanwhile: lock the file there now
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def tree_entries(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """(path relative to `folder`, "file" | "dir" | "link" | "other") of everything under it,
    sorted, links never followed."""
    folder = Path(folder)
    kinds = {stat.S_ISLNK: "link", stat.S_ISDIR: "dir", stat.S_ISREG: "file"}
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = Path(root) / name
            mode = path.lstat().st_mode
            kind = next((k for test, k in kinds.items() if test(mode)), "other")
            found.append((path.relative_to(folder).as_posix(), kind))
    return found


def stat_digest(paths: Sequence[Path], root: Path) -> str:
    """SHA-256 of the names (relative to `root`), sizes and change times of `paths`, in order.

    A cheap content key for a large image set: a file added, removed, renamed or rewritten in any
    way changes it (the inode change time cannot be set back by a user).
    """
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        rel = p.relative_to(root).as_posix()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """np.savez atomically (no pickled objects inside), byte-identical for the same arrays.

    np.savez stamps every member with the current time; here each gets a fixed date, so an
    output DVC hashes does not change when it is written again.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o600 << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)
    return write_bytes(path, buf.getvalue())


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """np.save atomically."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return write_bytes(path, buf.getvalue())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load an .npz without allowing pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
