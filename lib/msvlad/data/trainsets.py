"""Training sets as class folders (ImageFolder layout); builders from GLDv2-clean and SfM-120k."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from msvlad.data.catalog import IMAGE_EXTS, not_found_hint
from msvlad.data.safe_pickle import load_pickle
from msvlad.data.testsets import _natural_key, check_relative_name
from msvlad.errors import InputError
from msvlad.paths import MANIFEST
from msvlad.storage import atomic_dir

log = logging.getLogger(__name__)


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
    def names(self) -> list[str]:
        """Image paths relative to the set's root (`<class>/<image>`), as the run logs name them."""
        return [str(Path(p).relative_to(self.root)) for p in self.paths]

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
            f"{not_found_hint(path.parent, path.name, 'train')}"
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
        raise InputError(f"{path}: no images found (expected <class>/<image>.jpg folders)")
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
        raise InputError(f"min_images_per_class must be >= 1, got {min_images_per_class}")
    if num_classes is not None and num_classes < 1:
        raise InputError(f"num_classes must be >= 1 or None, got {num_classes}")
    present, n_listed, n_missing = _read_gldv2_csv(train_clean_csv, images_dir)
    chosen = _choose_landmarks(present, min_images_per_class, num_classes, seed)
    if chosen is None:
        raise InputError(
            f"{images_dir}: no landmark of {train_clean_csv.name} has "
            f"{min_images_per_class}+ images on disk"
        )
    if n_missing:
        log.warning(
            "gldv2: %d of %d listed images are not under %s (tars not downloaded?)",
            n_missing,
            n_listed,
            images_dir,
        )
    with atomic_dir(out_dir) as tmp:
        n_images = 0
        for landmark in tqdm(chosen, desc="gldv2 classes", leave=False):
            (tmp / landmark).mkdir()
            for image_id, src in present[landmark]:
                _link(src, tmp / landmark / f"{image_id}.jpg")
                n_images += 1
        write_manifest(
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


def _read_gldv2_csv(
    train_clean_csv: Path, images_dir: Path
) -> tuple[dict[str, list[tuple[str, Path]]], int, int]:
    """Images of each landmark present under `images_dir`, and the listed and missing counts."""
    present: dict[str, list[tuple[str, Path]]] = {}
    n_listed = n_missing = 0
    first_row: dict[str, int] = {}
    try:
        with open(train_clean_csv, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["landmark_id", "images"]:
                raise InputError(
                    f"{train_clean_csv}: expected header 'landmark_id,images', got {header}"
                )
            for row_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) < 2:
                    raise InputError(f"{train_clean_csv}:{row_no}: expected 'landmark_id,images'")
                landmark = check_relative_name(
                    row[0].strip(), f"{train_clean_csv}:{row_no}: landmark_id", folders=False
                )
                for image_id in row[1].split():
                    if not re.fullmatch(r"[0-9a-fA-F]{3,}", image_id):
                        raise InputError(f"{train_clean_csv}:{row_no}: bad image id {image_id!r}")
                    if image_id in first_row:
                        raise InputError(
                            f"{train_clean_csv}:{row_no}: image {image_id} is listed twice "
                            f"(also row {first_row[image_id]})"
                        )
                    first_row[image_id] = row_no
                    n_listed += 1
                    src = images_dir / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
                    if src.is_file():
                        present.setdefault(landmark, []).append((image_id, src))
                    else:
                        n_missing += 1
    except UnicodeDecodeError as err:
        raise InputError(f"{train_clean_csv}: not UTF-8 text (byte {err.start})") from None
    except csv.Error as err:
        raise InputError(f"{train_clean_csv}: not a readable CSV file ({err})") from None
    return present, n_listed, n_missing


def _choose_landmarks(
    present: dict[str, list[tuple[str, Path]]],
    min_images_per_class: int,
    num_classes: int | None,
    seed: int,
) -> list[str] | None:
    """Landmarks with enough images, a seeded draw of `num_classes` of them; None if none has."""
    eligible = sorted(
        (k for k, v in present.items() if len(v) >= min_images_per_class), key=_natural_key
    )
    if not eligible:
        return None
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
    return chosen


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
        raise InputError(f"{db_pkl}: expected a dict with a {split!r} entry")
    part = db[split]
    if not isinstance(part, Mapping) or "cids" not in part or "cluster" not in part:
        raise InputError(f"{db_pkl}: {split!r} must hold 'cids' and 'cluster'")
    try:
        raw_cids = list(part["cids"])
        clusters = np.asarray(part["cluster"]).ravel()
    except (TypeError, ValueError):
        raise InputError(f"{db_pkl}: {split}: 'cids' and 'cluster' must be lists") from None
    cids: list[str] = []
    seen: dict[str, int] = {}
    for i, cid in enumerate(raw_cids):
        where = f"{db_pkl}: {split}: cids[{i}]"
        if not isinstance(cid, str):
            raise InputError(f"{where}: expected an image id string, got {type(cid).__name__}")
        check_relative_name(cid, where, folders=False)
        if cid in seen:
            raise InputError(f"{where}: {cid!r} is listed twice (also at [{seen[cid]}])")
        seen[cid] = i
        cids.append(cid)
    if len(cids) != len(clusters):
        raise InputError(f"{db_pkl}: {split}: {len(cids)} cids but {len(clusters)} cluster ids")
    if clusters.size and clusters.dtype.kind not in "iu":
        raise InputError(f"{db_pkl}: {split}: cluster ids must be integers")
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
        raise InputError(
            f"{ims_dir}: no {split} cluster has {min_images_per_class}+ images on disk"
        )
    with atomic_dir(out_dir) as tmp:
        n_images = 0
        for cl in tqdm(chosen, desc="sfm120k clusters", leave=False):
            (tmp / cl).mkdir()
            for cid, src in members[cl]:
                name = cid if PurePosixPath(cid).suffix.lower() in IMAGE_EXTS else f"{cid}.jpg"
                _link(src, tmp / cl / name)
                n_images += 1
        write_manifest(
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


def write_manifest(folder: Path, info: Mapping[str, Any]) -> None:
    """Record how a prepared dataset folder was built (sources, options, counts)."""
    (folder / MANIFEST).write_text(
        json.dumps(dict(info), indent=2, sort_keys=True, default=str) + "\n"
    )


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None if it has none or it is unreadable."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
