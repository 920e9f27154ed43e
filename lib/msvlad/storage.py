"""Atomic writes and safe reads: nothing half-written ever sits under a final name.

Every file is written to a temp file `.<name>.<random>.tmp` beside it and renamed; the result has
the permissions the umask gives a new file. A kill mid-write leaves only such a temp file, which
`remove_stale_temps` clears on the next run. Torch files carry a SHA-256 of their payload
(`payload_digest`), checked on load, so a corrupted checkpoint is refused with its name.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from msvlad.errors import CheckpointError, InputError

DIGEST_KEY = "sha256"  # the key of a torch file's payload checksum


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp makes 0600; honour the umask
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def umask() -> int:
    """The process umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it replaces `path` by rename.

    A failure leaves `path` untouched and removes the temp folder; the new folder gets the
    permissions the umask gives a new directory (mkdtemp would make it 0700).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    trash: Path | None = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, trash / "old")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically."""
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


def load_torch(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load restricted to tensors and plain containers (weights_only=True), digest checked.

    A file without a digest (written before digests existed) loads as it is.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        msg = " ".join(str(err).split())[:300]
        raise CheckpointError(
            f"{path}: cannot load checkpoint ({type(err).__name__}: {msg})"
        ) from None
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
    """Delete the temp files/folders an interrupted atomic write left in `folder` (for `name`)."""
    removed = []
    stem = "*" if name is None else glob.escape(name)
    for pattern in (f".{stem}.*.tmp", f".{stem}.*.old"):
        for p in map(Path, glob.glob(os.path.join(glob.escape(str(folder)), pattern))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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
