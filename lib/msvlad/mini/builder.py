"""Offline mini benchmark: real registry photos plus seeded synthetic views, revisitop layout.

Writes under `out_root`:
  mini-test/jpg/*.jpg, gnd_mini-test.pkl  revisited protocol: queries (image + bbx, not in the db)
                                          with per-query easy / hard / junk db indices
  mini-val/ (same layout)                 other scenes and other distractors, for choosing
  mini-train/<class>/<k>.jpg              ImageFolder classes, disjoint from every eval photo
  manifest.json                           provenance of every image (photo, seed, drawn values),
                                          counts, the sources and a fingerprint of all files
A scene is two or more real photos of one place or object. Each real photo is a query in turn (its
region of interest as bbx) and also a db image; seeded mild synthetic views of the photos add
queries up to `queries_per_scene`. For a query from photo i, the other real photos are positives
(hard if either photo is labelled hard, else easy), the db copy of photo i is junk (the same
picture), and the scene's synthetic db views (`synthetic.VIEW_SPECS` easy / hard / junk, cut around
each photo's region of interest) count at their level. Distractors are landmark look-alikes and
other photos used nowhere else, each with synthetic views at every level. Which photo plays which
role is the `role` column of `assets.PHOTOS_CSV`; a rebuild with the same seed and assets gives
byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from msvlad.data.catalog import GND_PICKLE_PROTOCOL, JPG, gnd_name
from msvlad.mini.assets import Manifest, PhotoRow, photo_table, read_manifest
from msvlad.mini.synthetic import VIEW_SPECS, Box, View, spec_record, synthesize_view
from msvlad.paths import MANIFEST
from msvlad.storage import atomic_dir, write_json

log = logging.getLogger(__name__)

DATASETS = ("mini-test", "mini-val", "mini-train")
JPEG_QUALITY = 90
SYNTHETIC_LEVELS = ("easy", "hard", "junk")  # the order of `views_per_scene`
TRAIN_LEVELS = ("easy", "hard")
SOURCE_RECORD = ("requirement", "licence")  # of each source, in <out_root>/manifest.json
_TRANSPOSE = {
    90: Image.Transpose.ROTATE_270,  # PIL's ROTATE_n turn counter-clockwise
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class Group:
    """Photos of one scene, class or distractor; for a scene, photos[0] is the reference view."""

    name: str
    photos: tuple[str, ...]  # photo ids `<source>/<name>` from the assets manifest
    levels: tuple[str, ...] = ()  # "easy" / "hard" of each photo in photos[1:] vs photos[0]
    rois: tuple[Box | None, ...] = ()  # per photo: scene region as fractions, None: seeded

    def __post_init__(self) -> None:
        if not self.photos:
            raise ValueError(f"group {self.name}: no photos")
        if self.levels and len(self.levels) != len(self.photos) - 1:
            raise ValueError(f"group {self.name}: need one level per photo after the first")
        if any(lv not in ("easy", "hard") for lv in self.levels):
            raise ValueError(f"group {self.name}: levels must be easy or hard, got {self.levels}")
        if self.rois and len(self.rois) != len(self.photos):
            raise ValueError(f"group {self.name}: need one roi (or None) per photo")

    def pair_level(self, i: int, j: int) -> str:
        """Label of real photo j as a positive of a query from photo i != j."""
        labels = ("easy", *self.levels) if self.levels else ("easy",) * len(self.photos)
        return "hard" if "hard" in (labels[i], labels[j]) else "easy"

    def roi(self, i: int) -> Box | None:
        """Curated scene region of photo i (fractions), or None."""
        return self.rois[i] if self.rois else None


@dataclass(frozen=True)
class Catalogue:
    """Which photos make the test/val scenes, train classes and distractors (all disjoint)."""

    test: tuple[Group, ...]
    val: tuple[Group, ...]
    train: tuple[Group, ...]
    test_distractors: tuple[Group, ...] = ()
    val_distractors: tuple[Group, ...] = ()

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for part in ("test", "val", "train", "test_distractors", "val_distractors"):
            for g in getattr(self, part):
                for p in g.photos:
                    if p in seen:
                        raise ValueError(
                            f"catalogue: photo {p} in both {seen[p]} and {part}/{g.name}"
                        )
                    seen[p] = f"{part}/{g.name}"
        names = [g.name for part in self.parts() for g in part]
        if len(set(names)) != len(names):
            raise ValueError("catalogue: group names must be unique")

    def parts(self) -> tuple[tuple[Group, ...], ...]:
        """All groups, part by part."""
        return self.test, self.val, self.train, self.test_distractors, self.val_distractors

    def photos(self) -> list[str]:
        """Every photo id it uses."""
        return [p for part in self.parts() for g in part for p in g.photos]


_ROLE_PART = {
    "test": "test",
    "val": "val",
    "train": "train",
    "distractor-test": "test_distractors",
    "distractor-val": "val_distractors",
}


def catalogue_from_rows(rows: Sequence[PhotoRow]) -> Catalogue:
    """Catalogue of photos.csv rows: groups and their photos in row order, with levels and rois."""
    members: dict[tuple[str, str], list[PhotoRow]] = {}
    for r in rows:
        members.setdefault((_ROLE_PART[r.role], r.group), []).append(r)
    parts: dict[str, list[Group]] = {p: [] for p in _ROLE_PART.values()}
    for (part, name), group in members.items():
        levels = tuple(r.level for r in group[1:]) if part in ("test", "val") else ()
        rois = tuple(_fractions(r.roi) for r in group)
        parts[part].append(
            Group(name, tuple(r.photo for r in group), levels, rois if any(rois) else ())
        )
    return Catalogue(**{k: tuple(v) for k, v in parts.items()})


def curated_catalogue() -> Catalogue:
    """The project's catalogue: every row of photos.csv."""
    return catalogue_from_rows(photo_table())


def curated_rotations() -> dict[str, int]:
    """Clockwise degrees that show a photo upright, for the photos of photos.csv that need it."""
    return {r.photo: r.rotate for r in photo_table() if r.rotate}


def _fractions(text: str) -> Box | None:
    if not text.strip():
        return None
    x1, y1, x2, y2 = (float(v) for v in text.split())
    if not 0 <= x1 < x2 <= 1 or not 0 <= y1 < y2 <= 1:
        raise ValueError(f"roi {text!r}: need 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
    return (x1, y1, x2, y2)


@dataclass(frozen=True)
class _Item:
    """One image to write, with its provenance record."""

    name: str
    group: str
    role: str  # query / db / train
    level: str  # real, query (synthetic query), easy / hard / junk, distractor[-level], train level
    photo: str
    seed: int | None
    params: dict | None


@dataclass(frozen=True)
class _Db:
    """A db image before shuffling: its scene, which real photo it shows or derives from, level."""

    group: str
    photo_index: int
    level: str  # real / easy / hard / junk / distractor
    data: bytes  # the JPEG file
    item: _Item


def build_mini_benchmark(
    assets_dir: Path,
    out_root: Path,
    *,
    seed: int = 0,
    image_max_side: int = 384,
    queries_per_scene: int = 8,
    views_per_scene: tuple[int, int, int] = (4, 6, 2),
    distractor_views: int = 6,
    train_views_per_class: int = 12,
    source_max_side: int = 1024,
    catalogue: Catalogue | None = None,
    rotations: dict[str, int] | None = None,
    workers: int | None = None,
) -> dict:
    """Build mini-test, mini-val (revisitop) and mini-train (class folders) from the assets cache.

    Args:
        assets_dir: folder written by `msvlad.mini.assets.fetch_assets` (photos/ + manifest.json).
        out_root: parent folder of the three datasets and manifest.json.
        seed: master seed; every view seed is derived from it and the image's name.
        image_max_side: longest side of every written image.
        queries_per_scene: queries per scene: every real photo, then mild synthetic views of them
            in turn up to this number.
        views_per_scene: synthetic (easy, hard, junk) db views per scene, on top of its real photos.
        distractor_views: synthetic views per distractor photo, on top of the photo itself.
        train_views_per_class: images per train class (real photos first, then synthetic views).
        source_max_side: photos are downscaled to this side before views are cut from them.
        catalogue: roles of the photos (default: photos.csv); every photo must be in the assets.
        rotations: clockwise degrees per photo id (default: photos.csv).
        workers: processes that render the groups (default: the usable CPUs); every image is a
            pure function of its photo and seed, so any count writes the same bytes.
    Returns:
        The summary written to `<out_root>/manifest.json` (counts, params, sources, fingerprint).
    """
    _check_counts(
        image_max_side, queries_per_scene, train_views_per_class, views_per_scene, distractor_views
    )
    assets_dir, out_root = Path(assets_dir), Path(out_root)
    manifest = read_manifest(assets_dir)
    photos = {p.photo_id: assets_dir / p.path for p in manifest.photos}
    cat = catalogue if catalogue is not None else curated_catalogue()
    _check_catalogue(cat, photos, assets_dir)
    rot = rotations if rotations is not None else curated_rotations()
    pool = _Groups((photos, source_max_side, rot), workers or _cpus())
    cfg = dict(seed=seed, max_side=image_max_side, groups=pool)
    digests: list[str] = []

    records: dict[str, list[dict]] = {}
    counts: dict[str, dict] = {}
    for ds, scenes, distractors in (
        ("mini-test", cat.test, cat.test_distractors),
        ("mini-val", cat.val, cat.val_distractors),
    ):
        if scenes:
            views = (queries_per_scene, views_per_scene, distractor_views)
            written = _write_retrieval(out_root, ds, scenes, distractors, views, cfg)
            records[ds], counts[ds], found = written
            digests += found
    with atomic_dir(out_root / "mini-train") as tmp:
        items = _build_train(tmp, cat.train, train_views_per_class, **cfg)
        digests += _digests(tmp, "mini-train")
    records["mini-train"] = [_record(it, f"{it.group}/{it.name}.jpg") for it in items]
    counts["mini-train"] = _train_counts(items, cat.train)
    pool.close()
    params = {
        "seed": seed,
        "image_max_side": image_max_side,
        "queries_per_scene": queries_per_scene,
        "views_per_scene": list(views_per_scene),
        "distractor_views": distractor_views,
        "train_views_per_class": train_views_per_class,
        "source_max_side": source_max_side,
    }
    summary = _summary(digests, counts, params, manifest, pool.used)
    write_json(out_root / MANIFEST, {**summary, "images": records})
    log.info("mini benchmark in %s: %s", out_root, _brief(counts))
    return summary


def _write_retrieval(
    out_root: Path,
    ds: str,
    scenes: Sequence[Group],
    distractors: Sequence[Group],
    views: tuple[int, tuple[int, int, int], int],
    cfg: dict[str, Any],
) -> tuple[list[dict], dict, list[str]]:
    """Write one revisitop dataset (images and gnd pickle) atomically: its manifest records,
    counts and file digests."""
    with atomic_dir(out_root / ds) as tmp:
        items, gnd = _build_retrieval(tmp, ds, scenes, distractors, *views, **cfg)
        blob = pickle.dumps(gnd, protocol=GND_PICKLE_PROTOCOL)
        (tmp / gnd_name(ds)).write_bytes(blob)
        digests = _digests(tmp, ds)
    records = [_record(it, f"{JPG}/{it.name}.jpg") for it in items]
    return records, _retrieval_counts(items, gnd, scenes, distractors), digests


def _check_counts(
    image_max_side: int,
    queries_per_scene: int,
    train_views_per_class: int,
    views_per_scene: tuple[int, int, int],
    distractor_views: int,
) -> None:
    """The image side and the view counts a build takes (ValueError naming the argument)."""
    if image_max_side < 32:
        raise ValueError(f"image_max_side: must be >= 32, got {image_max_side}")
    if queries_per_scene < 1 or train_views_per_class < 1:
        raise ValueError("queries_per_scene, train_views_per_class: must be >= 1")
    if len(views_per_scene) != 3 or min(views_per_scene) < 0 or distractor_views < 0:
        raise ValueError("views_per_scene: three counts >= 0; distractor_views: >= 0")


def _check_catalogue(cat: Catalogue, photos: dict[str, Path], assets_dir: Path) -> None:
    """Every photo of the catalogue in the assets; test scenes and train classes; 2+ per scene."""
    missing = sorted(set(cat.photos()) - set(photos))
    if missing:
        raise ValueError(
            f"{assets_dir}: {len(missing)} catalogue photos are not in the assets manifest "
            f"(first: {missing[:3]}); fetch them with msvlad.mini.assets.fetch_assets"
        )
    if not cat.test or not cat.train:
        raise ValueError("catalogue: needs test scenes and train classes")
    if any(len(g.photos) < 2 for g in (*cat.test, *cat.val)):
        raise ValueError("catalogue: every test and val scene needs two or more real photos")


def _summary(
    digests: list[str], counts: dict, params: dict, manifest: Manifest, used: set[str]
) -> dict:
    """What a build made: the fingerprint of its files, counts, params, sources, photo digests."""
    sources = {pid.split("/", 1)[0] for pid in used}
    by_id = manifest.by_id()
    return {
        "fingerprint": hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest(),
        "counts": counts,
        "params": {
            **params,
            "jpeg_quality": JPEG_QUALITY,
            "view_specs": {k: spec_record(v) for k, v in sorted(VIEW_SPECS.items())},
        },
        "sources": {k: _pinned(v) for k, v in sorted(manifest.sources.items()) if k in sources},
        "photos": {pid: by_id[pid].sha256 for pid in sorted(used)},
    }


# -------------------------------------------------------------------------------- builders


def _build_retrieval(
    root: Path,
    ds: str,
    scenes: Sequence[Group],
    distractors: Sequence[Group],
    queries_per_scene: int,
    views_per_scene: tuple[int, int, int],
    distractor_views: int,
    *,
    seed: int,
    max_side: int,
    groups: _Groups,
) -> tuple[list[_Item], dict]:
    """Write queries and db of one revisitop-style dataset; return the items and the gnd dict."""
    jpg = root / JPG
    jpg.mkdir()
    items: list[_Item] = []
    db: list[_Db] = []
    queries: list[tuple[str, Group, int, list[float]]] = []  # name, scene, photo index, bbx
    tasks = [(_scene, (ds, g, queries_per_scene, views_per_scene, seed, max_side)) for g in scenes]
    tasks += [(_distractor, (ds, g, distractor_views, seed, max_side)) for g in distractors]
    for g, (written, asked, views) in zip(
        [*scenes, *distractors], groups.map(tasks, f"{ds} groups"), strict=True
    ):
        for name, data, it in written:
            (jpg / f"{name}.jpg").write_bytes(data)
            items.append(it)
        queries += [(name, g, i, bbx) for name, i, bbx in asked]
        db += views

    # Shuffle the db with a seeded permutation so that index order carries no label.
    order = np.random.default_rng(_seed(seed, ds, "order")).permutation(len(db))
    shuffled = [db[int(k)] for k in order]
    imlist: list[str] = []
    per_group: dict[str, int] = {}
    for d in shuffled:
        k = per_group.get(d.group, 0)
        per_group[d.group] = k + 1
        name = f"{d.group}_{k:03d}"
        (jpg / f"{name}.jpg").write_bytes(d.data)
        imlist.append(name)
        items.append(_renamed(d.item, name))
    gnd = [_query_gnd(shuffled, g, i, bbx) for _, g, i, bbx in queries]
    return items, {"imlist": imlist, "qimlist": [q[0] for q in queries], "gnd": gnd}


def _query_gnd(shuffled: list[_Db], g: Group, i: int, bbx: list[float]) -> dict:
    """Ground truth of a query from photo i of scene g: easy / hard / junk db indices and bbx."""
    ix: dict[str, list[int]] = {lv: [] for lv in SYNTHETIC_LEVELS}
    for k, d in enumerate(shuffled):
        if d.group != g.name:
            continue
        if d.level == "real":
            ix["junk" if d.photo_index == i else g.pair_level(i, d.photo_index)].append(k)
        else:
            ix[d.level].append(k)
    return {"easy": ix["easy"], "hard": ix["hard"], "junk": ix["junk"], "bbx": bbx}


def _scene(
    loader: _Loader,
    ds: str,
    g: Group,
    queries_per_scene: int,
    views_per_scene: tuple[int, int, int],
    seed: int,
    max_side: int,
) -> tuple[list[tuple[str, bytes, _Item]], list[tuple[str, int, list[float]]], list[_Db]]:
    """One scene: its query files, its queries (name, photo index, bbx) and its db images."""
    written, asked, db = [], [], []
    srcs = [loader(p) for p in g.photos]
    rois = [_scene_roi(g, i, s.size, _seed(seed, ds, g.name, "roi", i)) for i, s in enumerate(srcs)]
    for k in range(max(len(srcs), queries_per_scene)):
        i, name = k % len(srcs), f"{g.name}_q{k}"
        if k < len(srcs):
            img, _ = _resize(srcs[i], max_side)
            sx, sy = img.width / srcs[i].width, img.height / srcs[i].height
            x1, y1, x2, y2 = rois[i]
            bbx = [x1 * sx, y1 * sy, min(x2 * sx, img.width), min(y2 * sy, img.height)]
            it = _Item(name, g.name, "query", "real", g.photos[i], None, None)
        else:
            s = _seed(seed, ds, name)
            view = synthesize_view(srcs[i], VIEW_SPECS["query"], s, max_side=max_side)
            img, bbx = view.image, _map_box(view, rois[i])
            it = _Item(name, g.name, "query", "query", g.photos[i], s, view.params)
        written.append((name, _jpeg(img), it))
        asked.append((name, i, [round(float(v), 2) for v in bbx]))
    for i, src in enumerate(srcs):
        img, _ = _resize(src, max_side)
        it = _Item("", g.name, "db", "real", g.photos[i], *_NO)
        db.append(_Db(g.name, i, "real", _jpeg(img), it))
    for level, n in zip(SYNTHETIC_LEVELS, views_per_scene, strict=True):
        for j in range(n):
            i = j % len(srcs)
            view = _view(srcs[i], level, _seed(seed, ds, g.name, level, j), max_side, rois[i])
            db.append(
                _Db(
                    g.name,
                    i,
                    level,
                    _jpeg(view.image),
                    _view_item(g.name, level, g.photos[i], view),
                )
            )
    return written, asked, db


def _distractor(
    loader: _Loader, ds: str, g: Group, distractor_views: int, seed: int, max_side: int
) -> tuple[list, list, list[_Db]]:
    """One distractor group: its photos and synthetic views, all db images."""
    db = []
    for i, pid in enumerate(g.photos):
        img, _ = _resize(loader(pid), max_side)
        db.append(
            _Db(
                g.name,
                i,
                "distractor",
                _jpeg(img),
                _Item("", g.name, "db", "distractor", pid, *_NO),
            )
        )
    for j in range(distractor_views):
        i, level = j % len(g.photos), SYNTHETIC_LEVELS[j % len(SYNTHETIC_LEVELS)]
        s = _seed(seed, ds, g.name, "distractor", j)
        view = _view(loader(g.photos[i]), level, s, max_side, None)
        item = _view_item(g.name, f"distractor-{level}", g.photos[i], view)
        db.append(_Db(g.name, i, "distractor", _jpeg(view.image), item))
    return [], [], db


def _build_train(
    root: Path, classes: Sequence[Group], views: int, *, seed: int, max_side: int, groups: _Groups
) -> list[_Item]:
    """Write one folder per class: its real photos, then seeded easy/hard synthetic views."""
    items = []
    tasks = [(_train_class, (g, views, seed, max_side)) for g in classes]
    for g, written in zip(classes, groups.map(tasks, "mini-train classes"), strict=True):
        (root / g.name).mkdir()
        for name, data, it in written:
            (root / g.name / f"{name}.jpg").write_bytes(data)
            items.append(it)
    return items


def _train_class(
    loader: _Loader, g: Group, views: int, seed: int, max_side: int
) -> list[tuple[str, bytes, _Item]]:
    """One training class: its real photos, then seeded easy/hard synthetic views."""
    written = []
    for k in range(views):
        name = f"{k:02d}"
        pid = g.photos[k % len(g.photos)]
        if k < len(g.photos):
            img, _ = _resize(loader(pid), max_side)
            it = _Item(name, g.name, "train", "real", pid, None, None)
        else:
            level = TRAIN_LEVELS[k % len(TRAIN_LEVELS)]
            view = _view(loader(pid), level, _seed(seed, "mini-train", g.name, k), max_side, None)
            img, it = view.image, _renamed(_view_item(g.name, level, pid, view), name, "train")
        written.append((name, _jpeg(img), it))
    return written


class _Groups:
    """Renders groups (scenes, distractors, classes) in worker processes, results in task order.

    Each worker opens the photos it needs with its own `_Loader`; the photos the tasks opened are
    gathered in `used`. One worker renders in this process.
    """

    def __init__(self, loader_args: tuple, workers: int) -> None:
        self.loader_args, self.workers = loader_args, max(1, workers)
        self.used: set[str] = set()
        self._pool: Any = None
        self._local: _Loader | None = None

    def map(self, tasks: Sequence[tuple[Callable, tuple]], desc: str) -> Iterator:
        """The results of `fn(loader, *args)` for each task, in order, with a progress bar."""
        if self.workers == 1 or len(tasks) < 2:
            if self._local is None:
                self._local = _Loader(*self.loader_args)
            results = (_render(self._local, task) for task in tasks)
        else:
            if self._pool is None:
                ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
                self._pool = ctx.Pool(self.workers, _init_worker, (self.loader_args,))
            results = self._pool.imap(_run_task, tasks)
        for out, used in tqdm(results, total=len(tasks), desc=desc, leave=False):
            self.used |= used
            yield out

    def close(self) -> None:
        """Stop the workers."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


_WORKER_LOADER: _Loader | None = None


def _init_worker(loader_args: tuple) -> None:
    global _WORKER_LOADER
    _WORKER_LOADER = _Loader(*loader_args)


def _run_task(task: tuple[Callable, tuple]) -> tuple[Any, set[str]]:
    assert _WORKER_LOADER is not None
    return _render(_WORKER_LOADER, task)


def _render(loader: _Loader, task: tuple[Callable, tuple]) -> tuple[Any, set[str]]:
    """A task's result and the photos it opened."""
    fn, args = task
    loader.used = set()
    return fn(loader, *args), loader.used


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -------------------------------------------------------------------------------- helpers

_NO = (None, None)  # no seed, no drawn parameters: a real photo


class _Loader:
    """Open photos once, upright, RGB, downscaled to `max_side`; records which ids were used."""

    def __init__(self, paths: dict[str, Path], max_side: int, rotations: dict[str, int]) -> None:
        self.paths, self.max_side, self.rotations = paths, max_side, rotations
        self.used: set[str] = set()
        self._load = lru_cache(maxsize=None)(self._open)

    def __call__(self, photo_id: str) -> Image.Image:
        self.used.add(photo_id)
        return self._load(photo_id)

    def _open(self, photo_id: str) -> Image.Image:
        path = self.paths[photo_id]
        with Image.open(path) as im:
            im.draft("RGB", (self.max_side, self.max_side))  # fast JPEG decode at a reduced scale
            img = ImageOps.exif_transpose(im).convert("RGB")
        if self.rotations.get(photo_id, 0):
            img = img.transpose(_TRANSPOSE[self.rotations[photo_id]])
        img, _ = _resize(img, self.max_side)
        return img


def _view(src: Image.Image, level: str, seed: int, max_side: int, roi: Box | None) -> View:
    return synthesize_view(src, VIEW_SPECS[level], seed, max_side=max_side, roi=roi)


def _view_item(group: str, level: str, photo: str, view: View) -> _Item:
    return _Item("", group, "db", level, photo, int(view.params["seed"]), view.params)


def _renamed(it: _Item, name: str, role: str | None = None) -> _Item:
    return _Item(name, it.group, role or it.role, it.level, it.photo, it.seed, it.params)


def _resize(img: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """Downscale so the longest side is at most `max_side`; returns the image and the scale."""
    scale = min(1.0, max_side / max(img.size))
    if scale == 1.0:
        return img.copy(), 1.0
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    out = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return out, out.width / img.width


def _scene_roi(g: Group, i: int, size: tuple[int, int], seed: int) -> Box:
    """Scene region of photo i in pixels: curated fractions, or a seeded central 40-70 % box."""
    w, h = size
    roi = g.roi(i)
    if roi is not None:
        x1, y1, x2, y2 = roi
    else:
        rng = np.random.default_rng(seed)
        side = float(np.sqrt(rng.uniform(0.4, 0.7)))
        cx = 0.5 + rng.uniform(-0.5, 0.5) * (1 - side) / 2
        cy = 0.5 + rng.uniform(-0.5, 0.5) * (1 - side) / 2
        x1, y1, x2, y2 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    return (x1 * w, y1 * h, x2 * w, y2 * h)


def _map_box(view: View, roi: Box) -> list[float]:
    """Bounding box of the roi mapped into a view, clipped to the view."""
    x1, y1, x2, y2 = roi
    pts = view.source_to_view(np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]))
    w, h = view.image.size
    bx1, by1 = np.clip(pts.min(0), 0, [w - 1, h - 1])
    bx2, by2 = np.clip(pts.max(0), [bx1 + 1, by1 + 1], [w, h])
    return [float(bx1), float(by1), float(bx2), float(by2)]


def _jpeg(img: Image.Image) -> bytes:
    """The JPEG file of an image (quality `JPEG_QUALITY`)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _digests(root: Path, ds: str) -> list[str]:
    """`<sha256>  <ds>/<path>` of every file under a dataset folder (for the fingerprint)."""
    return [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {ds}/{p.relative_to(root).as_posix()}"
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


def _seed(*parts: object) -> int:
    """Stable 63-bit seed from a tuple of names (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _pinned(source: dict | str) -> dict | str:
    """What the benchmark records of a source: its pin and licence, not how it was fetched.

    The archive file and its sha256 depend on how the assets folder was filled (downloaded now,
    placed by hand, or kept from an earlier fetch that did not record them); they stay in the
    assets manifest, so the benchmark's files are the same on every machine.
    """
    if not isinstance(source, dict):
        return source  # a free-form label (generated test assets)
    return {k: source[k] for k in SOURCE_RECORD if k in source}


def _record(it: _Item, file: str) -> dict:
    rec = {"file": file, "group": it.group, "role": it.role, "level": it.level, "photo": it.photo}
    if it.seed is not None:
        rec["seed"] = it.seed
        rec["params"] = it.params
    return rec


def _retrieval_counts(
    items: Sequence[_Item], gnd: dict, scenes: Sequence[Group], distractors: Sequence[Group]
) -> dict:
    queries = [it for it in items if it.role == "query"]
    db = [it for it in items if it.role == "db"]
    return {
        "scenes": [g.name for g in scenes],
        "queries": len(gnd["qimlist"]),
        "real_queries": sum(it.level == "real" for it in queries),
        "db": len(gnd["imlist"]),
        "db_real": sum(it.level == "real" for it in db),
        "db_distractors": sum(it.level.startswith("distractor") for it in db),
        "distractor_groups": [g.name for g in distractors],
        "positives_per_query": {
            lv: round(float(np.mean([len(g[lv]) for g in gnd["gnd"]])), 2)
            for lv in SYNTHETIC_LEVELS
        },
    }


def _brief(counts: dict) -> str:
    parts = []
    for ds, c in counts.items():
        if "queries" in c:
            parts.append(f"{ds} {len(c['scenes'])} scenes {c['queries']} queries {c['db']} db")
        else:
            parts.append(f"{ds} {c['classes']} classes {c['images']} images")
    return "; ".join(parts)


def _train_counts(items: Sequence[_Item], classes: Sequence[Group]) -> dict:
    return {
        "classes": len(classes),
        "images": len(items),
        "real_images": sum(it.level == "real" for it in items),
    }
