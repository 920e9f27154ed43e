"""Retrieval test sets in revisitop layout: loading, ground-truth checks, protocol, rotations."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from msvlad.config import load_yaml
from msvlad.data.catalog import (
    DATASETS,
    IMAGE_EXTS,
    JPG,
    ROTATIONS,
    Protocol,
    gnd_name,
    not_found_hint,
)
from msvlad.data.safe_pickle import load_pickle
from msvlad.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalDataset:
    """A retrieval benchmark in revisitop layout: names, ground truth and evaluation protocol."""

    name: str
    root: Path  # the folder holding jpg/ and gnd_<name>.pkl
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]
    protocol: Protocol
    ext: str = ".jpg"
    rotations: dict[str, int] = field(default_factory=dict)  # image name -> clockwise degrees

    def __len__(self) -> int:
        """Number of database images."""
        return len(self.imlist)

    @property
    def num_queries(self) -> int:
        """Number of queries."""
        return len(self.qimlist)

    def _path(self, name: str) -> Path:
        suffix = PurePosixPath(name).suffix.lower()
        return self.root / JPG / (name if suffix in IMAGE_EXTS else name + self.ext)

    def image_path(self, i: int) -> Path:
        """File of database image `i`."""
        return self._path(self.imlist[i])

    def query_path(self, i: int) -> Path:
        """File of query `i` (uncropped: pass `query_bbx(i)` to `load_image`)."""
        return self._path(self.qimlist[i])

    def query_bbx(self, i: int) -> tuple[float, float, float, float] | None:
        """Query crop (x1, y1, x2, y2) in original pixels, or None (Holidays, or no box given)."""
        if self.protocol == "holidays":
            return None
        bbx = self.gnd[i].get("bbx")
        return None if bbx is None else tuple(float(v) for v in bbx)  # type: ignore[return-value]


def _index_array(value: Any, n_db: int, where: str) -> np.ndarray:
    """A list of database indices: integers in [0, n_db), each once (not a boolean mask)."""
    if value is None:
        return np.zeros(0, dtype=np.int64)
    try:
        arr = np.asarray(value).ravel()
    except (TypeError, ValueError):
        raise InputError(f"{where}: indices must be a flat list of integers") from None
    items = value if isinstance(value, list | tuple) else arr if arr.dtype.kind == "O" else ()
    if any(isinstance(v, bool | np.bool_) for v in items):
        raise InputError(f"{where}: holds booleans; expected database indices, not a mask")
    if arr.dtype.kind == "b":
        raise InputError(
            f"{where}: a boolean mask of {arr.size} values; expected a list of database indices"
        )
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        try:
            as_float = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{where}: indices must be integers") from None
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            raise InputError(f"{where}: indices must be integers")
        arr = as_float
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= n_db:
        raise InputError(f"{where}: index {int(arr[arr >= n_db][0])} out of range [0, {n_db})")
    if arr.dtype.kind == "f" and np.any(np.abs(arr) >= 2**62):
        bad = arr[np.abs(arr) >= 2**62][0]
        raise InputError(f"{where}: index {bad:.0f} out of range [0, {n_db})")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n_db)]
    if bad.size:
        raise InputError(f"{where}: index {int(bad[0])} out of range [0, {n_db})")
    values, counts = np.unique(arr, return_counts=True)
    if np.any(counts > 1):
        k = int(np.argmax(counts > 1))
        raise InputError(
            f"{where}: index {int(values[k])} listed {int(counts[k])} times "
            "(each image at most once: a repeat changes the AP)"
        )
    return arr


def _bbx(value: Any, where: str) -> tuple[float, float, float, float]:
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise InputError(f"{where}: bbx must be 4 numbers (x1, y1, x2, y2)") from None
    if arr.size != 4 or not np.all(np.isfinite(arr)):
        raise InputError(f"{where}: bbx must be 4 finite numbers (x1, y1, x2, y2), got {value!r}")
    if arr[2] <= arr[0] or arr[3] <= arr[1]:
        raise InputError(f"{where}: bbx {tuple(arr.tolist())} is empty (need x2 > x1 and y2 > y1)")
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


def infer_protocol(gnd: Sequence[Mapping[str, Any]], source: str = "gnd") -> Protocol | None:
    """Protocol from gnd keys: easy/hard -> revisited, query_db_index -> holidays, ok -> classic."""
    found: Protocol | None = None
    for i, g in enumerate(gnd):
        if not isinstance(g, Mapping):
            raise InputError(
                f"{source}: query {i}: gnd entry must be a dict, got {type(g).__name__}"
            )
        if "easy" in g and "hard" in g:
            proto: Protocol = "revisited"
        elif "query_db_index" in g:
            proto = "holidays"
        elif "ok" in g:
            proto = "classic"
        else:
            raise InputError(
                f"{source}: query {i}: gnd keys {sorted(g)} match no protocol "
                "(need easy/hard/junk, ok/junk, or ok/query_db_index)"
            )
        if found is not None and proto != found:
            raise InputError(f"{source}: query {i}: {proto} keys after {found} entries")
        found = proto
    return found


def validate_gnd(
    cfg: Any, source: str, protocol: Protocol | None = None
) -> tuple[list[str], list[str], list[dict], Protocol]:
    """Check a revisitop-style gnd dict; return (imlist, qimlist, normalised gnd, protocol).

    Index lists become int64 arrays checked to lie in [0, len(imlist)), boxes become 4-tuples of
    floats. Refused, because each silently changes a query's AP in revisitop's compute_map: an
    index listed twice in a list, an image in two of a query's lists (easy/hard/junk, ok/junk),
    a boolean mask instead of indices, a name twice in imlist or qimlist, and a name that is not
    a relative path inside jpg/ (`check_relative_name`). Every error is one line naming `source`,
    the query (index and name) and the list.
    """
    if not isinstance(cfg, Mapping):
        raise InputError(
            f"{source}: expected a dict with imlist, qimlist and gnd, got {type(cfg).__name__}"
        )
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise InputError(f"{source}: missing key(s) {missing} (need imlist, qimlist, gnd)")
    imlist = _names(cfg["imlist"], f"{source}: imlist")
    qimlist = _names(cfg["qimlist"], f"{source}: qimlist")
    if not isinstance(cfg["gnd"], list | tuple):
        raise InputError(
            f"{source}: gnd: expected a list of per-query dicts, got {type(cfg['gnd']).__name__}"
        )
    raw = list(cfg["gnd"])
    if len(raw) != len(qimlist):
        raise InputError(f"{source}: {len(raw)} gnd entries for {len(qimlist)} queries")
    inferred = infer_protocol(raw, source)
    if inferred is None and protocol is None:
        raise InputError(f"{source}: no queries, so the protocol cannot be inferred")
    if inferred is not None and protocol is not None and inferred != protocol:
        raise InputError(f"{source}: gnd keys give the {inferred} protocol, expected {protocol}")
    proto: Protocol = inferred or protocol  # type: ignore[assignment]
    n_db = len(imlist)
    index_keys = {
        "revisited": ("easy", "hard", "junk"),
        "classic": ("ok", "junk"),
        "holidays": ("ok",),
    }[proto]
    gnd: list[dict] = []
    for i, g in enumerate(raw):
        where = f"{source}: query {i} ({qimlist[i]})"
        entry = dict(g)
        for key in index_keys:
            if key not in entry and not (key == "junk" and proto == "classic"):
                raise InputError(f"{where}: missing '{key}'")
            entry[key] = _index_array(entry.get(key), n_db, f"{where} '{key}'")
        _check_disjoint(entry, index_keys, imlist, where)
        if entry.get("bbx") is not None:
            entry["bbx"] = _bbx(entry["bbx"], where)
        elif proto == "revisited":
            raise InputError(f"{where}: missing 'bbx' (revisited queries must be cropped)")
        if proto == "holidays":
            q = int(_index_array([entry["query_db_index"]], n_db, f"{where} 'query_db_index'")[0])
            if q in set(entry["ok"].tolist()):
                raise InputError(f"{where}: query_db_index {q} is also listed in 'ok'")
            if imlist[q] != qimlist[i]:
                raise InputError(f"{where}: query_db_index {q} names {imlist[q]!r}, not the query")
            entry["query_db_index"] = q
        gnd.append(entry)
    return imlist, qimlist, gnd, proto


def _check_disjoint(
    entry: Mapping[str, np.ndarray], keys: Sequence[str], imlist: Sequence[str], where: str
) -> None:
    """Refuse an image in two of a query's lists (easy/hard/junk, ok/junk).

    revisitop's compute_map has no rule for it: the image counts as a positive at its own rank
    and as removed junk for every positive ranked after it, which can push AP above 1.
    """
    for a, b in itertools.combinations(keys, 2):
        both = np.intersect1d(entry[a], entry[b])
        if both.size:
            k = int(both[0])
            raise InputError(
                f"{where}: index {k} ({imlist[k]}) is in both '{a}' and '{b}' "
                "(an image has one label per query)"
            )


def _names(value: Any, where: str) -> list[str]:
    """A non-empty list of distinct image names under jpg/; a string or number is not split."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise InputError(f"{where}: expected a list of image names, got {type(value).__name__}")
    if not value:
        raise InputError(f"{where}: is empty")
    bad = next((i for i, v in enumerate(value) if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise InputError(f"{where}[{bad}]: expected a non-empty string, got {value[bad]!r}")
    names = [str(v) for v in value]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        check_relative_name(name, f"{where}[{i}]")
        if name in seen:
            raise InputError(f"{where}[{i}]: {name!r} is listed twice (also at [{seen[name]}])")
        seen[name] = i
    return names


def check_relative_name(name: str, where: str, *, folders: bool = True) -> str:
    """`name` if it is a relative path that stays inside its folder, else one InputError line.

    Refused: empty, absolute (``/x``, ``\\x``, ``C:x``), a ``..``, ``.`` or empty component, a
    backslash, a NUL or other control character; `folders=False` also refuses any ``/``.
    """
    shown = repr(name) if len(name) <= 80 else repr(name[:60] + "..." + name[-15:])
    if not name or any(ord(c) < 32 for c in name) or "\\" in name:
        raise InputError(f"{where}: {shown} is not a plain file name (refused)")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise InputError(f"{where}: {shown} is an absolute path (refused)")
    parts = name.split("/")
    if not folders and len(parts) > 1:
        raise InputError(f"{where}: {shown} holds a '/' (refused: a plain file name is needed)")
    if any(p in ("", ".", "..") for p in parts):
        raise InputError(f"{where}: {shown} leaves or re-enters its folder (refused)")
    return name


def read_rotations(path: str | os.PathLike) -> dict[str, int]:
    """Read a rotation list (name -> clockwise degrees): JSON/YAML or 'name deg' lines.

    Every error is one line naming the file: unreadable text, invalid JSON/YAML, a name given
    twice, a name that is not a plain image name, degrees that are not a multiple of 90.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: rotation list not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{path}: not UTF-8 text (byte {err.start}); expected a rotation list"
        ) from None
    pairs: list[tuple[Any, Any]]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_Pairs)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, _Pairs):
            raise InputError(f"{path}: expected a JSON object of image name -> degrees")
        pairs = data
    elif path.suffix.lower() in (".yaml", ".yml"):
        pairs = _yaml_pairs(path, text)
    else:
        pairs = []
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = re.split(r"[\s:,]+", line)
            if len(parts) != 2:
                raise InputError(f"{path}:{n}: expected 'name degrees', got {line!r}")
            pairs.append((parts[0], parts[1]))
    out: dict[str, int] = {}
    seen: set[str] = set()
    for name, deg in pairs:
        if not isinstance(name, str | int) or isinstance(name, bool):
            raise InputError(f"{path}: {name!r} is not an image name")
        stem = _stem(check_relative_name(str(name), str(path), folders=False))
        if stem in seen:
            raise InputError(f"{path}: {name}: image listed twice")
        seen.add(stem)
        try:
            value = int(float(deg))
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"{path}: {name}: rotation {deg!r} is not a number") from None
        if value % 90:
            raise InputError(f"{path}: {name}: rotation {value} is not a multiple of 90 degrees")
        value %= 360
        if value:
            out[stem] = value
    return out


class _Pairs(list):
    """The (key, value) pairs of a JSON object, in order, duplicates kept (to be refused)."""


def _yaml_pairs(path: Path, text: str) -> list[tuple[Any, Any]]:
    """The (key, value) pairs of a YAML mapping read strictly (`msvlad.config.load_yaml`)."""
    data = load_yaml(text, str(path))  # no anchors or aliases, no duplicate names
    if data is None:
        return []
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of image name -> degrees")
    return list(data.items())


def _stem(name: str) -> str:
    p = PurePosixPath(name)
    return p.name[: -len(p.suffix)] if p.suffix.lower() in IMAGE_EXTS else p.name


def load_dataset(data_root: str | os.PathLike, name: str) -> RetrievalDataset:
    """Load ROOT/NAME (jpg/ + gnd_NAME.pkl, via the restricted unpickler) as a RetrievalDataset."""
    data_root = Path(data_root)
    root = data_root / name
    gnd_file = root / gnd_name(name)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: dataset folder not found; {not_found_hint(data_root, name)}"
        )
    if not gnd_file.is_file():
        raise FileNotFoundError(
            f"{gnd_file}: ground truth not found; {not_found_hint(data_root, name)}"
        )
    spec = DATASETS.get(name)
    imlist, qimlist, gnd, protocol = validate_gnd(
        load_pickle(gnd_file), str(gnd_file), spec.protocol if spec is not None else None
    )
    rotations: dict[str, int] = {}
    if (root / ROTATIONS).is_file():
        rotations = read_rotations(root / ROTATIONS)
        unknown = sorted(set(rotations) - set(imlist) - set(qimlist))
        if unknown:
            raise InputError(
                f"{root / ROTATIONS}: {len(unknown)} name(s) not in the dataset, "
                f"e.g. {unknown[0]!r}"
            )
    ds = RetrievalDataset(name, root, imlist, qimlist, gnd, protocol, rotations=rotations)
    _check_images(ds, data_root)
    return ds


def _check_images(ds: RetrievalDataset, data_root: Path) -> None:
    names = dict.fromkeys([*ds.imlist, *ds.qimlist])
    missing = [n for n in names if not ds._path(n).is_file()]
    for what, listed in (("database images", ds.imlist), ("queries", ds.qimlist)):
        if missing and len(missing) < len(names) and not any(ds._path(n).is_file() for n in listed):
            raise InputError(
                f"{ds.root / JPG}: none of the {len(listed)} {what} of {ds.name} found "
                f"(e.g. {listed[0]})"
            )
    if missing and len(missing) == len(names):
        raise FileNotFoundError(
            f"{ds.root / JPG}: none of the {len(names)} images of {ds.name} found "
            f"(e.g. {missing[0]}); "
            f"{not_found_hint(data_root, ds.name)}"
        )
    if missing:
        log.warning(
            "%s: %d of %d images missing under %s (e.g. %s); they will be skipped",
            ds.name,
            len(missing),
            len(names),
            ds.root / JPG,
            missing[0],
        )


def _natural_key(s: str) -> tuple[int, int | str]:
    return (0, int(s)) if s.isdigit() else (1, s)


def load_distractors(data_root: str | os.PathLike, name: str = "revisitop1m") -> list[Path]:
    """Paths of the prepared R1M distractors listed in ROOT/NAME/NAME.txt that exist on disk."""
    root = Path(data_root) / name
    listing = root / f"{name}.txt"
    if not listing.is_file():
        raise FileNotFoundError(
            f"{listing}: distractor list not found; {not_found_hint(Path(data_root), name)}"
        )
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(
            f"{listing}: not UTF-8 text (byte {err.start}); expected image names"
        ) from None
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        check_relative_name(name, f"{listing}:{n}")
        if name in seen:
            raise InputError(f"{listing}:{n}: {name!r} is listed twice (also line {seen[name]})")
        seen[name] = n
    names = list(seen)
    paths = [root / JPG / (n if PurePosixPath(n).suffix else n + ".jpg") for n in names]
    present = [p for p in paths if p.is_file()]
    if not present:
        raise FileNotFoundError(f"{root / JPG}: none of the {len(names)} listed distractors found")
    if len(present) < len(paths):
        log.warning(
            "%s: %d of %d listed distractors present (partial download)",
            name,
            len(present),
            len(paths),
        )
    return present
