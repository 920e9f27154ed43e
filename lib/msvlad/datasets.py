"""Retrieval test sets (revisitop layout), training sets (class folders), and their preparation.

Layouts
- Test sets: ``ROOT/NAME/jpg/<image>.jpg`` + ``ROOT/NAME/gnd_NAME.pkl``, the revisitop layout. The
  pickle is a dict with ``imlist`` (database names, no extension), ``qimlist`` (query names) and
  ``gnd``, one dict per query: ``easy/hard/junk/bbx`` (revisited ROxf/RPar), ``ok/junk/bbx``
  (classic Oxford5k/Paris6k) or ``ok/query_db_index`` (INRIA Holidays, whose queries are in the
  database and are removed from their own ranking). ANY folder laid out this way is a dataset;
  the protocol is read off the gnd keys. An optional ``rotations.json`` (image name -> clockwise
  degrees) lists images to turn upright before description (Holidays, manually rotated).
- Training sets: ``ROOT/NAME/<class>/<image>.jpg`` (torchvision ImageFolder style), built from
  GLDv2-clean or SfM-120k with hard links (symlinks where hard links fail), never copies.
- Downloads land in ``ROOT/downloads/<host>/<path>``: the layout `wget -x` writes, which is also
  the layout a mirror must have. ``mirror=`` or ``$MSVLAD_MIRROR`` (``http://...`` or
  ``file:///...``) replaces the official hosts: ``<mirror>/<host>/<path>``.
- Every downloaded file's sha256 is recorded in ``ROOT/checksums.json`` on first use and checked on
  every later use (see `msvlad.download`); GLDv2 tars are also checked against Google's md5 files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
from tqdm import tqdm

from msvlad.download import ChecksumRegistry, download_file, extract_archive
from msvlad.safe_pickle import load_pickle

log = logging.getLogger(__name__)

Protocol = Literal["revisited", "classic", "holidays"]
DatasetKind = Literal["test", "train", "distractors"]

MIRROR_ENV = "MSVLAD_MIRROR"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
MANIFEST = "manifest.json"
ROTATIONS = "rotations.json"
GND_PICKLE_PROTOCOL = 4

# Images of the original Paris6k archives that hold an HTML error page instead of a JPEG
# (https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/corrupt.txt).
PARIS_CORRUPT: frozenset[str] = frozenset(
    f"paris_{n}"
    for n in (
        "louvre_000136",
        "louvre_000146",
        "moulinrouge_000422",
        "museedorsay_001059",
        "notredame_000188",
        "pantheon_000284",
        "pantheon_000960",
        "pantheon_000974",
        "pompidou_000195",
        "pompidou_000196",
        "pompidou_000201",
        "pompidou_000467",
        "pompidou_000640",
        "sacrecoeur_000299",
        "sacrecoeur_000330",
        "sacrecoeur_000353",
        "triomphe_000662",
        "triomphe_000833",
        "triomphe_000863",
        "triomphe_000867",
    )
)

# ----------------------------------------------------------------------------- official URLs

REVISITOP_GND = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{ds}/gnd_{ds}.pkl"
CIRTORCH_GND = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/{ds}/gnd_{ds}.pkl"
OXFORD_IMAGES = ("https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",)
PARIS_IMAGES = (
    "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
    "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz",
)
HOLIDAYS_IMAGES = (
    "ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg1.tar.gz",
    "ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg2.tar.gz",
)
R1M_LIST = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt"
R1M_ARCHIVE = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{i}.tar.gz"
R1M_NUM_ARCHIVES = 100
GLDV2_CLEAN_CSV = "https://s3.amazonaws.com/google-landmark/metadata/train_clean.csv"
GLDV2_TAR = "https://s3.amazonaws.com/google-landmark/train/images_{i:03d}.tar"
GLDV2_MD5 = "https://s3.amazonaws.com/google-landmark/md5sum/train/md5.images_{i:03d}.txt"
GLDV2_NUM_TARS = 500
SFM120K_IMAGES = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/ims/ims.tar.gz"
SFM120K_DB = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/dbs/retrieval-SfM-120k.pkl"


# ----------------------------------------------------------------------------- test sets


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
        return self.root / "jpg" / (name if suffix in IMAGE_EXTS else name + self.ext)

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
    if value is None:
        return np.zeros(0, dtype=np.int64)
    try:
        arr = np.asarray(value).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"{where}: indices must be a flat list of integers") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        try:
            as_float = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: indices must be integers") from None
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            raise ValueError(f"{where}: indices must be integers")
        arr = as_float
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n_db)]
    if bad.size:
        raise ValueError(f"{where}: index {int(bad[0])} out of range [0, {n_db})")
    return arr


def _bbx(value: Any, where: str) -> tuple[float, float, float, float]:
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"{where}: bbx must be 4 numbers (x1, y1, x2, y2)") from None
    if arr.size != 4 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: bbx must be 4 finite numbers (x1, y1, x2, y2), got {value!r}")
    if arr[2] <= arr[0] or arr[3] <= arr[1]:
        raise ValueError(f"{where}: bbx {tuple(arr.tolist())} is empty (need x2 > x1 and y2 > y1)")
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


def infer_protocol(gnd: Sequence[Mapping[str, Any]], source: str = "gnd") -> Protocol | None:
    """Protocol from gnd keys: easy/hard -> revisited, query_db_index -> holidays, ok -> classic."""
    found: Protocol | None = None
    for i, g in enumerate(gnd):
        if not isinstance(g, Mapping):
            raise ValueError(
                f"{source}: query {i}: gnd entry must be a dict, got {type(g).__name__}"
            )
        if "easy" in g and "hard" in g:
            proto: Protocol = "revisited"
        elif "query_db_index" in g:
            proto = "holidays"
        elif "ok" in g:
            proto = "classic"
        else:
            raise ValueError(
                f"{source}: query {i}: gnd keys {sorted(g)} match no protocol "
                "(need easy/hard/junk, ok/junk, or ok/query_db_index)"
            )
        if found is not None and proto != found:
            raise ValueError(f"{source}: query {i}: {proto} keys after {found} entries")
        found = proto
    return found


def validate_gnd(
    cfg: Any, source: str, protocol: Protocol | None = None
) -> tuple[list[str], list[str], list[dict], Protocol]:
    """Check a revisitop-style gnd dict; return (imlist, qimlist, normalised gnd, protocol).

    Index lists become int64 arrays checked to lie in [0, len(imlist)), boxes become 4-tuples of
    floats; every error names `source` and the query index.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(
            f"{source}: expected a dict with imlist, qimlist and gnd, got {type(cfg).__name__}"
        )
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing} (need imlist, qimlist, gnd)")
    imlist = [str(x) for x in cfg["imlist"]]
    qimlist = [str(x) for x in cfg["qimlist"]]
    raw = list(cfg["gnd"])
    if len(raw) != len(qimlist):
        raise ValueError(f"{source}: {len(raw)} gnd entries for {len(qimlist)} queries")
    inferred = infer_protocol(raw, source)
    if inferred is None and protocol is None:
        raise ValueError(f"{source}: no queries, so the protocol cannot be inferred")
    if inferred is not None and protocol is not None and inferred != protocol:
        raise ValueError(f"{source}: gnd keys give the {inferred} protocol, expected {protocol}")
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
                raise ValueError(f"{where}: missing '{key}'")
            entry[key] = _index_array(entry.get(key), n_db, f"{where} '{key}'")
        if entry.get("bbx") is not None:
            entry["bbx"] = _bbx(entry["bbx"], where)
        elif proto == "revisited":
            raise ValueError(f"{where}: missing 'bbx' (revisited queries must be cropped)")
        if proto == "holidays":
            q = int(_index_array([entry["query_db_index"]], n_db, f"{where} 'query_db_index'")[0])
            if q in set(entry["ok"].tolist()):
                raise ValueError(f"{where}: query_db_index {q} is also listed in 'ok'")
            if imlist[q] != qimlist[i]:
                raise ValueError(f"{where}: query_db_index {q} names {imlist[q]!r}, not the query")
            entry["query_db_index"] = q
        gnd.append(entry)
    return imlist, qimlist, gnd, proto


def read_rotations(path: str | os.PathLike) -> dict[str, int]:
    """Read a rotation list (name -> clockwise degrees): JSON/YAML or 'name deg' lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: rotation list not found")
    text = path.read_text()
    data: Any
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = {}
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = re.split(r"[\s:,]+", line)
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected 'name degrees', got {line!r}")
            data[parts[0]] = parts[1]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of image name -> degrees")
    out: dict[str, int] = {}
    for name, deg in data.items():
        try:
            value = int(float(deg))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {name}: rotation {deg!r} is not a number") from None
        if value % 90:
            raise ValueError(f"{path}: {name}: rotation {value} is not a multiple of 90 degrees")
        value %= 360
        if value:
            out[_stem(str(name))] = value
    return out


def _stem(name: str) -> str:
    p = PurePosixPath(name)
    return p.name[: -len(p.suffix)] if p.suffix.lower() in IMAGE_EXTS else p.name


def _not_found_hint(data_root: Path, name: str, kind: DatasetKind = "test") -> str:
    if name in DATASETS:
        return (
            f"run `python -m msvlad prepare` with {name} listed in params.yaml (data.test_sets/"
            f"train_set), or call msvlad.datasets.prepare_dataset({name!r}, {str(data_root)!r})"
        )
    folder = data_root / name
    if kind == "train":
        where = f"place images in class folders {folder}/<class>/<image>.jpg"
    else:
        where = (
            f"place images in {folder / 'jpg'} and the ground truth in {folder / f'gnd_{name}.pkl'}"
        )
    if name.startswith("mini-"):
        where += " (or run `python -m msvlad prepare`: the mini profile builds mini-* offline)"
    return where


def load_dataset(data_root: str | os.PathLike, name: str) -> RetrievalDataset:
    """Load ROOT/NAME (jpg/ + gnd_NAME.pkl, via the restricted unpickler) as a RetrievalDataset."""
    data_root = Path(data_root)
    root = data_root / name
    gnd_file = root / f"gnd_{name}.pkl"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: dataset folder not found; {_not_found_hint(data_root, name)}"
        )
    if not gnd_file.is_file():
        raise FileNotFoundError(
            f"{gnd_file}: ground truth not found; {_not_found_hint(data_root, name)}"
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
            raise ValueError(
                f"{root / ROTATIONS}: {len(unknown)} name(s) not in the dataset, "
                f"e.g. {unknown[0]!r}"
            )
    ds = RetrievalDataset(name, root, imlist, qimlist, gnd, protocol, rotations=rotations)
    _check_images(ds, data_root)
    return ds


def _check_images(ds: RetrievalDataset, data_root: Path) -> None:
    names = dict.fromkeys([*ds.imlist, *ds.qimlist])
    missing = [n for n in names if not ds._path(n).is_file()]
    if missing and len(missing) == len(names):
        raise FileNotFoundError(
            f"{ds.root / 'jpg'}: none of the {len(names)} images of {ds.name} found "
            f"(e.g. {missing[0]}); "
            f"{_not_found_hint(data_root, ds.name)}"
        )
    if missing:
        log.warning(
            "%s: %d of %d images missing under %s (e.g. %s); they will be skipped",
            ds.name,
            len(missing),
            len(names),
            ds.root / "jpg",
            missing[0],
        )


# ----------------------------------------------------------------------------- training sets


@dataclass(frozen=True)
class TrainingSet:
    """A class-folder training set: one path and one integer label per image."""

    root: Path
    paths: list[Path]
    labels: np.ndarray  # (N,) int64, index into `classes`
    classes: list[str]  # sorted class-folder names

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


def load_training_set(path: str | os.PathLike) -> TrainingSet:
    """Read ROOT/NAME/<class>/<image> (sorted classes and files, deterministic labels)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: training set folder not found; "
            f"{_not_found_hint(path.parent, path.name, 'train')}"
        )
    class_dirs = sorted(
        (d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    empty: list[str] = []
    for d in class_dirs:
        files = sorted(
            (
                f
                for f in d.rglob("*")
                if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith(".") and f.is_file()
            ),
            key=lambda f: f.relative_to(d).as_posix(),
        )
        if not files:
            empty.append(d.name)
            continue
        label = len(classes)
        classes.append(d.name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if empty:
        log.warning("%s: %d empty class folder(s) ignored (e.g. %s)", path, len(empty), empty[0])
    if not paths:
        raise ValueError(f"{path}: no images found (expected <class>/<image>.jpg folders)")
    return TrainingSet(path, paths, np.asarray(labels, dtype=np.int64), classes)


def _link(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst`, or symlink it where hard links fail (another filesystem)."""
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(src.resolve(), dst)


def build_gldv2_clean(
    train_clean_csv: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_classes: int | None = None,
    min_images_per_class: int = 2,
    seed: int = 0,
) -> Path:
    """Lay out GLDv2-clean (or a seeded subset of its landmarks) as class folders of links.

    Args:
        train_clean_csv: ``landmark_id,images`` rows, images space-separated ids.
        images_dir: extracted train tars, images at ``a/b/c/<id>.jpg`` (first three id characters).
        num_classes: draw this many landmarks (seeded) among those with enough images; None = all.
        min_images_per_class: landmarks with fewer images present on disk are dropped.
    """
    train_clean_csv, images_dir, out_dir = Path(train_clean_csv), Path(images_dir), Path(out_dir)
    if min_images_per_class < 1:
        raise ValueError(f"min_images_per_class must be >= 1, got {min_images_per_class}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
    present: dict[str, list[tuple[str, Path]]] = {}
    n_listed = n_missing = 0
    with open(train_clean_csv, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["landmark_id", "images"]:
            raise ValueError(
                f"{train_clean_csv}: expected header 'landmark_id,images', got {header}"
            )
        for row_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2:
                raise ValueError(f"{train_clean_csv}:{row_no}: expected 'landmark_id,images'")
            landmark = row[0].strip()
            for image_id in row[1].split():
                if not re.fullmatch(r"[0-9a-fA-F]{3,}", image_id):
                    raise ValueError(f"{train_clean_csv}:{row_no}: bad image id {image_id!r}")
                n_listed += 1
                src = images_dir / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
                if src.is_file():
                    present.setdefault(landmark, []).append((image_id, src))
                else:
                    n_missing += 1
    eligible = sorted(
        (k for k, v in present.items() if len(v) >= min_images_per_class), key=_natural_key
    )
    if not eligible:
        raise ValueError(
            f"{images_dir}: no landmark of {train_clean_csv.name} has "
            f"{min_images_per_class}+ images on disk"
        )
    chosen = eligible
    if num_classes is not None:
        if num_classes > len(eligible):
            log.warning(
                "gldv2: %d classes requested, only %d have %d+ images; using all",
                num_classes,
                len(eligible),
                min_images_per_class,
            )
        else:
            pick = np.random.default_rng(seed).choice(len(eligible), num_classes, replace=False)
            chosen = [eligible[i] for i in sorted(pick.tolist())]
    if n_missing:
        log.warning(
            "gldv2: %d of %d listed images are not under %s (tars not downloaded?)",
            n_missing,
            n_listed,
            images_dir,
        )
    with staged_dir(out_dir) as tmp:
        n_images = 0
        for landmark in tqdm(chosen, desc="gldv2 classes", leave=False):
            (tmp / landmark).mkdir()
            for image_id, src in present[landmark]:
                _link(src, tmp / landmark / f"{image_id}.jpg")
                n_images += 1
        _write_manifest(
            tmp,
            {
                "source": "gldv2_clean",
                "classes": len(chosen),
                "images": n_images,
                "listed_images": n_listed,
                "missing_images": n_missing,
                "num_classes": num_classes,
                "min_images_per_class": min_images_per_class,
                "seed": seed,
            },
        )
    log.info("gldv2-clean: %d classes, %d images -> %s", len(chosen), n_images, out_dir)
    return out_dir


def sfm120k_image_path(ims_dir: Path, cid: str) -> Path:
    """cirtorch's cid2filename: ``ims/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid``."""
    return ims_dir / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def build_sfm120k(
    db_pkl: str | os.PathLike,
    ims_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: Literal["train", "val"] = "train",
    min_images_per_class: int = 2,
) -> Path:
    """Lay out a retrieval-SfM-120k split as class folders of links (class = 3D-model cluster)."""
    db_pkl, ims_dir, out_dir = Path(db_pkl), Path(ims_dir), Path(out_dir)
    db = load_pickle(db_pkl)
    if not isinstance(db, Mapping) or split not in db:
        raise ValueError(f"{db_pkl}: expected a dict with a {split!r} entry")
    part = db[split]
    if not isinstance(part, Mapping) or "cids" not in part or "cluster" not in part:
        raise ValueError(f"{db_pkl}: {split!r} must hold 'cids' and 'cluster'")
    cids = [str(c) for c in part["cids"]]
    clusters = np.asarray(part["cluster"]).ravel()
    if len(cids) != len(clusters):
        raise ValueError(f"{db_pkl}: {split}: {len(cids)} cids but {len(clusters)} cluster ids")
    if clusters.size and clusters.dtype.kind not in "iu":
        raise ValueError(f"{db_pkl}: {split}: cluster ids must be integers")
    width = len(str(int(clusters.max()))) if clusters.size else 1
    members: dict[str, list[tuple[str, Path]]] = {}
    n_missing = 0
    for cid, cl in zip(cids, clusters.tolist(), strict=True):
        src = sfm120k_image_path(ims_dir, cid)
        if not src.is_file():
            n_missing += 1
            continue
        members.setdefault(f"{int(cl):0{width}d}", []).append((cid, src))
    if n_missing:
        log.warning(
            "sfm120k: %d of %d %s images missing under %s", n_missing, len(cids), split, ims_dir
        )
    chosen = sorted(k for k, v in members.items() if len(v) >= min_images_per_class)
    if not chosen:
        raise ValueError(
            f"{ims_dir}: no {split} cluster has {min_images_per_class}+ images on disk"
        )
    with staged_dir(out_dir) as tmp:
        n_images = 0
        for cl in tqdm(chosen, desc="sfm120k clusters", leave=False):
            (tmp / cl).mkdir()
            for cid, src in members[cl]:
                name = cid if PurePosixPath(cid).suffix.lower() in IMAGE_EXTS else f"{cid}.jpg"
                _link(src, tmp / cl / name)
                n_images += 1
        _write_manifest(
            tmp,
            {
                "source": "retrieval-SfM-120k",
                "split": split,
                "classes": len(chosen),
                "images": n_images,
                "missing_images": n_missing,
                "min_images_per_class": min_images_per_class,
            },
        )
    log.info("sfm120k %s: %d clusters, %d images -> %s", split, len(chosen), n_images, out_dir)
    return out_dir


def _natural_key(s: str) -> tuple[int, int | str]:
    return (0, int(s)) if s.isdigit() else (1, s)


# ----------------------------------------------------------------------------- distractors


def load_distractors(data_root: str | os.PathLike, name: str = "revisitop1m") -> list[Path]:
    """Paths of the prepared R1M distractors listed in ROOT/NAME/NAME.txt that exist on disk."""
    root = Path(data_root) / name
    listing = root / f"{name}.txt"
    if not listing.is_file():
        raise FileNotFoundError(
            f"{listing}: distractor list not found; {_not_found_hint(Path(data_root), name)}"
        )
    names = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
    paths = [root / "jpg" / (n if PurePosixPath(n).suffix else n + ".jpg") for n in names]
    present = [p for p in paths if p.is_file()]
    if not present:
        raise FileNotFoundError(
            f"{root / 'jpg'}: none of the {len(names)} listed distractors found"
        )
    if len(present) < len(paths):
        log.warning(
            "%s: %d of %d listed distractors present (partial download)",
            name,
            len(present),
            len(paths),
        )
    return present


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """A downloadable dataset: what it is, where it comes from, and how to lay it out."""

    name: str
    kind: DatasetKind
    protocol: Protocol | None
    description: str
    urls: tuple[str, ...]
    builder: Callable[..., Path] = field(repr=False)


def resolve_mirror(mirror: str | None = None) -> str | None:
    """The mirror to use: the argument, else $MSVLAD_MIRROR, else None (official hosts)."""
    return mirror or os.environ.get(MIRROR_ENV) or None


def url_key(url: str) -> str:
    """``host/path`` of an official URL: its place in a mirror, downloads/ and checksums.json."""
    parts = urlsplit(url)
    return f"{parts.hostname}{parts.path}"


def mirror_url(url: str, mirror: str | None) -> str:
    """The official `url`, or ``<mirror>/<host>/<path>`` when a mirror is given."""
    return url if not mirror else f"{mirror.rstrip('/')}/{url_key(url)}"


@dataclass(frozen=True)
class Fetcher:
    """Downloads official files (or mirror copies) to ROOT/downloads/<host>/<path>, verified."""

    data_root: Path
    mirror: str | None = None
    timeout: float = 30.0

    @property
    def registry(self) -> ChecksumRegistry:
        """Trust-on-first-use sha256 record, ROOT/checksums.json."""
        return ChecksumRegistry(self.data_root / "checksums.json")

    def local_path(self, url: str) -> Path:
        """Where the file of `url` is kept (and where to place it by hand offline)."""
        return self.data_root / "downloads" / url_key(url)

    def fetch(self, url: str, *, md5: str | None = None, sha256: str | None = None) -> Path:
        """Download `url` (or reuse the verified local copy) and return its path."""
        return download_file(
            mirror_url(url, self.mirror),
            self.local_path(url),
            md5=md5,
            sha256=sha256,
            desc=PurePosixPath(url).name,
            timeout=self.timeout,
            registry=self.registry,
            key=url_key(url),
        )


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `out_dir`; on success it replaces `out_dir` by rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    trash: Path | None = None
    try:
        yield tmp
        if out_dir.exists():
            trash = Path(
                tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent)
            )
            os.replace(out_dir, trash / "old")
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _write_manifest(folder: Path, info: Mapping[str, Any]) -> None:
    (folder / MANIFEST).write_text(
        json.dumps(dict(info), indent=2, sort_keys=True, default=str) + "\n"
    )


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_jpeg(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == b"\xff\xd8\xff"


def _flatten_images(src: Path, jpg: Path, known_corrupt: frozenset[str]) -> list[str]:
    """Move every image under `src` into `jpg/` (flat); skip known-corrupt or non-JPEG files."""
    skipped: list[str] = []
    for f in sorted(
        p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file()
    ):
        if _stem(f.name) in known_corrupt or not _is_jpeg(f):
            skipped.append(f.name)
            continue
        target = jpg / f.name
        if target.exists():
            raise ValueError(f"{f}: two archive members share the name {f.name}")
        os.replace(f, target)
    return skipped


def _build_revisitop(
    data_root: Path,
    name: str,
    fetcher: Fetcher,
    gnd_url: str,
    image_urls: Sequence[str],
    protocol: Protocol,
    known_corrupt: frozenset[str] = frozenset(),
) -> Path:
    gnd_path = fetcher.fetch(gnd_url)
    imlist, qimlist, _, _ = validate_gnd(load_pickle(gnd_path), str(gnd_path), protocol)
    archives = [fetcher.fetch(u) for u in image_urls]
    out = data_root / name
    with staged_dir(out) as tmp:
        jpg = tmp / "jpg"
        jpg.mkdir()
        skipped: list[str] = []
        for i, archive in enumerate(archives):
            extracted = extract_archive(archive, tmp / f"_extract{i}")
            skipped += _flatten_images(extracted, jpg, known_corrupt)
            shutil.rmtree(extracted)
        shutil.copyfile(gnd_path, tmp / f"gnd_{name}.pkl")
        if skipped:
            log.warning(
                "%s: skipped %d corrupt image(s) (not JPEG data): %s%s",
                name,
                len(skipped),
                ", ".join(skipped[:5]),
                " ..." if len(skipped) > 5 else "",
            )
            (tmp / "skipped.txt").write_text("".join(f"{s}\n" for s in skipped))
        names = dict.fromkeys([*imlist, *qimlist])
        absent = [n for n in names if not (jpg / f"{n}.jpg").is_file()]
        skipped_stems = {_stem(s) for s in skipped}
        lost = [n for n in absent if n not in skipped_stems]
        if lost:
            raise ValueError(
                f"{gnd_path}: {len(lost)} listed image(s) are in none of the archives "
                f"{[a.name for a in archives]}, e.g. {lost[0]}"
            )
        if absent:
            log.warning(
                "%s: %d image(s) listed in the gnd were corrupt and skipped, e.g. %s",
                name,
                len(absent),
                absent[0],
            )
        _write_manifest(
            tmp,
            {
                "name": name,
                "protocol": protocol,
                "images": sum(1 for _ in jpg.iterdir()),
                "db": len(imlist),
                "queries": len(qimlist),
                "skipped": skipped,
                "sources": [gnd_url, *image_urls],
            },
        )
    log.info("%s: %d db images, %d queries -> %s", name, len(imlist), len(qimlist), out)
    return out


def _prepare_roxford5k(data_root: Path, fetcher: Fetcher, **options: Any) -> Path:
    _no_options("roxford5k", options)
    return _build_revisitop(
        data_root,
        "roxford5k",
        fetcher,
        REVISITOP_GND.format(ds="roxford5k"),
        OXFORD_IMAGES,
        "revisited",
    )


def _prepare_rparis6k(data_root: Path, fetcher: Fetcher, **options: Any) -> Path:
    _no_options("rparis6k", options)
    return _build_revisitop(
        data_root,
        "rparis6k",
        fetcher,
        REVISITOP_GND.format(ds="rparis6k"),
        PARIS_IMAGES,
        "revisited",
        PARIS_CORRUPT,
    )


def _prepare_oxford5k(data_root: Path, fetcher: Fetcher, **options: Any) -> Path:
    _no_options("oxford5k", options)
    return _build_revisitop(
        data_root, "oxford5k", fetcher, CIRTORCH_GND.format(ds="oxford5k"), OXFORD_IMAGES, "classic"
    )


def _prepare_paris6k(data_root: Path, fetcher: Fetcher, **options: Any) -> Path:
    _no_options("paris6k", options)
    return _build_revisitop(
        data_root,
        "paris6k",
        fetcher,
        CIRTORCH_GND.format(ds="paris6k"),
        PARIS_IMAGES,
        "classic",
        PARIS_CORRUPT,
    )


def holidays_ground_truth(imlist: Sequence[str]) -> dict[str, Any]:
    """Holidays gnd dict from file names (6 digits; first 4 = group; xxxx00 = the group's query)."""
    from msvlad.evaluation import holidays_gnd

    qimlist, gnd = holidays_gnd(imlist)
    return {
        "imlist": list(imlist),
        "qimlist": qimlist,
        "gnd": [
            {"ok": [int(j) for j in g["ok"]], "query_db_index": int(g["query_db_index"])}
            for g in gnd
        ],
    }


def _write_gnd(path: Path, cfg: Mapping[str, Any]) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump(dict(cfg), f, protocol=GND_PICKLE_PROTOCOL)


def _prepare_holidays(data_root: Path, fetcher: Fetcher, **options: Any) -> Path:
    _no_options("holidays", options)
    archives = [fetcher.fetch(u) for u in HOLIDAYS_IMAGES]
    out = data_root / "holidays"
    with staged_dir(out) as tmp:
        jpg = tmp / "jpg"
        jpg.mkdir()
        skipped: list[str] = []
        for i, archive in enumerate(archives):
            extracted = extract_archive(archive, tmp / f"_extract{i}")
            skipped += _flatten_images(extracted, jpg, frozenset())
            shutil.rmtree(extracted)
        if skipped:
            log.warning(
                "holidays: skipped %d corrupt image(s): %s", len(skipped), ", ".join(skipped[:5])
            )
        imlist = sorted(_stem(p.name) for p in jpg.iterdir())
        cfg = holidays_ground_truth(imlist)
        _write_gnd(tmp / "gnd_holidays.pkl", cfg)
        _write_manifest(
            tmp,
            {
                "name": "holidays",
                "protocol": "holidays",
                "db": len(imlist),
                "queries": len(cfg["qimlist"]),
                "skipped": skipped,
                "sources": list(HOLIDAYS_IMAGES),
            },
        )
    log.info("holidays: %d images, %d queries -> %s", len(imlist), len(cfg["qimlist"]), out)
    return out


def _prepare_holidays_rotated(
    data_root: Path, fetcher: Fetcher, *, rotations: str | os.PathLike | None = None, **options: Any
) -> Path:
    _no_options("holidays_rotated", options)
    if rotations is None:
        raise ValueError(
            "holidays_rotated needs a rotation list (image name -> clockwise degrees): pass "
            "rotations=FILE (params.yaml prepare.holidays_rotations)"
        )
    table = read_rotations(rotations)
    try:
        src = load_dataset(data_root, "holidays")
    except FileNotFoundError:
        prepare_dataset("holidays", data_root, mirror=fetcher.mirror, timeout=fetcher.timeout)
        src = load_dataset(data_root, "holidays")
    unknown = sorted(set(table) - set(src.imlist))
    if unknown:
        raise ValueError(
            f"{rotations}: {len(unknown)} name(s) are not Holidays images, e.g. {unknown[0]!r}"
        )
    out = data_root / "holidays_rotated"
    with staged_dir(out) as tmp:
        (tmp / "jpg").mkdir()
        for n in src.imlist:
            _link(src._path(n), tmp / "jpg" / src._path(n).name)
        _write_gnd(tmp / "gnd_holidays_rotated.pkl", holidays_ground_truth(src.imlist))
        (tmp / ROTATIONS).write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        _write_manifest(
            tmp,
            {
                "name": "holidays_rotated",
                "protocol": "holidays",
                "db": len(src.imlist),
                "queries": src.num_queries,
                "rotated_images": len(table),
                "rotations_file": str(rotations),
            },
        )
    log.info("holidays_rotated: %d of %d images rotated -> %s", len(table), len(src.imlist), out)
    return out


def _merge_tree(src: Path, dst: Path) -> int:
    """Move every file under `src` to the same relative place under `dst`; returns the count."""
    n = 0
    for f in src.rglob("*"):
        if f.is_file() or f.is_symlink():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
            n += 1
    return n


def _extract_into(archive: Path, target: Path, done_file: Path) -> None:
    """Extract `archive` into `target` once (listed in `done_file`, so a rerun resumes)."""
    done = set(done_file.read_text().split()) if done_file.is_file() else set()
    if archive.name in done:
        return
    target.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{archive.name}.extract"
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted run
    try:
        extract_archive(archive, tmp)
        _merge_tree(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(done_file, "a") as f:
        f.write(archive.name + "\n")


def _prepare_revisitop1m(
    data_root: Path,
    fetcher: Fetcher,
    *,
    num_archives: int = R1M_NUM_ARCHIVES,
    keep_archives: bool = True,
    **options: Any,
) -> Path:
    _no_options("revisitop1m", options)
    if not 1 <= num_archives <= R1M_NUM_ARCHIVES:
        raise ValueError(f"num_archives must be in [1, {R1M_NUM_ARCHIVES}], got {num_archives}")
    out = data_root / "revisitop1m"
    out.mkdir(parents=True, exist_ok=True)
    listing = fetcher.fetch(R1M_LIST)
    for i in tqdm(range(1, num_archives + 1), desc="revisitop1m archives", leave=False):
        url = R1M_ARCHIVE.format(i=i)
        if PurePosixPath(url).name in _done(out / ".extracted"):
            continue
        archive = fetcher.fetch(url)
        _extract_into(archive, out / "jpg", out / ".extracted")
        if not keep_archives:
            archive.unlink()
    shutil.copyfile(listing, out / "revisitop1m.txt")
    _write_manifest(
        out, {"name": "revisitop1m", "archives": num_archives, "sources": [R1M_LIST, R1M_ARCHIVE]}
    )
    return out


def _done(done_file: Path) -> set[str]:
    return set(done_file.read_text().split()) if done_file.is_file() else set()


def _parse_md5_file(path: Path, filename: str) -> str:
    """The md5 of `filename` from an md5sum-style file (``<md5>  <name>`` lines)."""
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    for parts in lines:
        if len(parts) >= 2 and PurePosixPath(parts[-1].lstrip("*")).name == filename:
            return parts[0].lower()
    if len(lines) == 1 and re.fullmatch(r"[0-9a-fA-F]{32}", lines[0][0]):
        return lines[0][0].lower()
    raise ValueError(f"{path}: no md5 for {filename}")


def _tar_indices(tars: int | Sequence[int] | None) -> list[int]:
    if tars is None:
        return list(range(GLDV2_NUM_TARS))
    idx = list(range(tars)) if isinstance(tars, int) else [int(t) for t in tars]
    bad = [t for t in idx if not 0 <= t < GLDV2_NUM_TARS]
    if bad or not idx:
        raise ValueError(f"tars must select indices in [0, {GLDV2_NUM_TARS}), got {tars!r}")
    return idx


def _prepare_gldv2_clean(
    data_root: Path,
    fetcher: Fetcher,
    *,
    num_classes: int | None = None,
    min_images_per_class: int = 2,
    seed: int = 0,
    tars: int | Sequence[int] | None = None,
    keep_archives: bool = True,
    **options: Any,
) -> Path:
    _no_options("gldv2_clean", options)
    csv_path = fetcher.fetch(GLDV2_CLEAN_CSV)
    raw = data_root / "raw" / "gldv2_train"
    raw.mkdir(parents=True, exist_ok=True)
    for i in tqdm(_tar_indices(tars), desc="gldv2 tars", leave=False):
        tar_url = GLDV2_TAR.format(i=i)
        if PurePosixPath(tar_url).name in _done(raw / ".extracted"):
            continue
        md5 = _parse_md5_file(fetcher.fetch(GLDV2_MD5.format(i=i)), PurePosixPath(tar_url).name)
        archive = fetcher.fetch(tar_url, md5=md5)
        _extract_into(archive, raw / "images", raw / ".extracted")
        if not keep_archives:
            archive.unlink()
    return build_gldv2_clean(
        csv_path,
        raw / "images",
        data_root / "gldv2_clean",
        num_classes=num_classes,
        min_images_per_class=min_images_per_class,
        seed=seed,
    )


def _prepare_sfm120k(
    data_root: Path,
    fetcher: Fetcher,
    *,
    split: Literal["train", "val"] = "train",
    min_images_per_class: int = 2,
    keep_archives: bool = True,
    **options: Any,
) -> Path:
    _no_options("sfm120k", options)
    db = fetcher.fetch(SFM120K_DB)
    raw = data_root / "raw" / "sfm120k"
    if "ims.tar.gz" not in _done(raw / ".extracted"):
        archive = fetcher.fetch(SFM120K_IMAGES)
        _extract_into(archive, raw / "extracted", raw / ".extracted")
        if not keep_archives:
            archive.unlink()
    ims = raw / "extracted"
    if (ims / "ims").is_dir():  # the archive may or may not hold a top-level ims/ folder
        ims = ims / "ims"
    return build_sfm120k(
        db, ims, data_root / "sfm120k", split=split, min_images_per_class=min_images_per_class
    )


def _no_options(name: str, options: Mapping[str, Any]) -> None:
    if options:
        raise TypeError(f"prepare_dataset({name!r}): unexpected option(s) {sorted(options)}")


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "roxford5k",
            "test",
            "revisited",
            "Revisited Oxford: 4993 db images, 70 cropped queries",
            (REVISITOP_GND.format(ds="roxford5k"), *OXFORD_IMAGES),
            _prepare_roxford5k,
        ),
        DatasetSpec(
            "rparis6k",
            "test",
            "revisited",
            "Revisited Paris: 6322 db images, 70 cropped queries",
            (REVISITOP_GND.format(ds="rparis6k"), *PARIS_IMAGES),
            _prepare_rparis6k,
        ),
        DatasetSpec(
            "oxford5k",
            "test",
            "classic",
            "Oxford5k (original protocol): 5063 images, 55 queries",
            (CIRTORCH_GND.format(ds="oxford5k"), *OXFORD_IMAGES),
            _prepare_oxford5k,
        ),
        DatasetSpec(
            "paris6k",
            "test",
            "classic",
            "Paris6k (original protocol): 55 queries",
            (CIRTORCH_GND.format(ds="paris6k"), *PARIS_IMAGES),
            _prepare_paris6k,
        ),
        DatasetSpec(
            "holidays",
            "test",
            "holidays",
            "INRIA Holidays as distributed: 1491 images, 500 queries",
            HOLIDAYS_IMAGES,
            _prepare_holidays,
        ),
        DatasetSpec(
            "holidays_rotated",
            "test",
            "holidays",
            "INRIA Holidays with a user-supplied list of images turned upright",
            HOLIDAYS_IMAGES,
            _prepare_holidays_rotated,
        ),
        DatasetSpec(
            "revisitop1m",
            "distractors",
            None,
            "R1M: 1M distractor images for ROxf/RPar",
            (R1M_LIST, R1M_ARCHIVE),
            _prepare_revisitop1m,
        ),
        DatasetSpec(
            "gldv2_clean",
            "train",
            None,
            "Google Landmarks v2 clean train subset (class folders)",
            (GLDV2_CLEAN_CSV, GLDV2_TAR, GLDV2_MD5),
            _prepare_gldv2_clean,
        ),
        DatasetSpec(
            "sfm120k",
            "train",
            None,
            "retrieval-SfM-120k (class = 3D-model cluster)",
            (SFM120K_DB, SFM120K_IMAGES),
            _prepare_sfm120k,
        ),
    )
}


def _loads(spec: DatasetSpec, data_root: Path) -> bool:
    """Whether DATA_ROOT/NAME already loads as a dataset of its kind."""
    try:
        if spec.kind == "test":
            load_dataset(data_root, spec.name)
        else:
            load_training_set(data_root / spec.name)
    except (OSError, ValueError):
        return False
    return True


def _options_key(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as recorded in the manifest; a rotation list is recorded by its content hash."""
    out = {}
    for k, v in sorted(options.items()):
        if k == "keep_archives":
            continue
        if k == "rotations" and v is not None:
            v = hashlib.sha256(Path(v).read_bytes()).hexdigest()
        out[k] = list(v) if isinstance(v, tuple) else v
    return json.loads(json.dumps(out, default=str))


def prepare_dataset(
    name: str,
    data_root: str | os.PathLike,
    *,
    mirror: str | None = None,
    timeout: float = 30.0,
    force: bool = False,
    **options: Any,
) -> Path:
    """Download, verify, extract and lay out a registry dataset as DATA_ROOT/NAME; returns it.

    Skips the work when DATA_ROOT/NAME was prepared with the same options (unless `force`).
    Options: gldv2_clean (num_classes, min_images_per_class, seed, tars, keep_archives), sfm120k
    (split, min_images_per_class, keep_archives), holidays_rotated (rotations), revisitop1m
    (num_archives, keep_archives).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registry names: {', '.join(sorted(DATASETS))}")
    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    out = data_root / name
    key = _options_key(options)
    spec = DATASETS[name]
    manifest = _read_manifest(out)
    if not force and spec.kind != "distractors":  # distractors resume archive by archive instead
        if manifest is not None and manifest.get("prepare_options") == key:
            log.info("%s: already prepared in %s", name, out)
            return out
        if manifest is None and out.is_dir() and _loads(spec, data_root):
            log.info(
                "%s: using the dataset already laid out in %s (not built by prepare)", name, out
            )
            return out
    fetcher = Fetcher(data_root, resolve_mirror(mirror), timeout)
    path = spec.builder(data_root, fetcher, **options)
    info = _read_manifest(path) or {}
    info["prepare_options"] = key
    _write_manifest(path, info)
    return path
