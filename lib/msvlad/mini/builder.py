"""Offline mini benchmark: real registry photos plus seeded synthetic views, revisitop layout.

Writes under `out_root`:
  mini-test/jpg/*.jpg, gnd_mini-test.pkl  revisited protocol: queries (full image + bbx, not in the
                                          db) with per-query easy / hard / junk db indices
  mini-val/ (same layout)                 held-out scenes for validation during training
  mini-train/<class>/<k>.jpg              ImageFolder classes, disjoint from test and val scenes
  manifest.json                           provenance of every image (photo, transform, seed), counts
A scene is one real photo (the query source) plus its real other views. Its db positives are those
real views, labelled easy or hard by how wide the baseline is, and seeded synthetic views at the
`synthetic.VIEW_SPECS` difficulty levels. Distractors are photos used nowhere else, together with
synthetic views of them; look-alikes (Chartres for Montmartre, satellite images for the aerial
scene) make hard negatives. A rebuild with the same seed and assets gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from msvlad.mini.assets import MANIFEST_NAME as ASSETS_MANIFEST
from msvlad.mini.assets import Manifest, read_manifest
from msvlad.mini.synthetic import VIEW_SPECS, Box, View, spec_record, synthesize_view
from msvlad.storage import atomic_dir, write_json

log = logging.getLogger(__name__)

DATASETS = ("mini-test", "mini-val", "mini-train")
PICKLE_PROTOCOL = 4
JPEG_QUALITY = 90
SYNTHETIC_LEVELS = ("easy", "hard", "junk")
TRAIN_LEVELS = ("easy", "hard")


@dataclass(frozen=True)
class Group:
    """Photos of one scene or class; for a scene, photos[0] is the query source."""

    name: str
    photos: tuple[str, ...]  # photo ids `<source>/<name>` from the assets manifest
    levels: tuple[str, ...] = ()  # label ("easy" / "hard") of each real other view photos[1:]
    roi: Box | None = None  # query region as fractions (x1, y1, x2, y2) of the query photo

    def __post_init__(self) -> None:
        if not self.photos:
            raise ValueError(f"group {self.name}: no photos")
        if self.levels and len(self.levels) != len(self.photos) - 1:
            raise ValueError(f"group {self.name}: need one level per real other view")
        if any(lv not in ("easy", "hard") for lv in self.levels):
            raise ValueError(f"group {self.name}: levels must be easy or hard, got {self.levels}")

    def level(self, i: int) -> str:
        """Label of real photo i >= 1 as a positive (easy unless listed)."""
        return self.levels[i - 1] if self.levels else "easy"


@dataclass(frozen=True)
class Catalogue:
    """Which photos make the test/val scenes, train classes and distractors (all disjoint)."""

    test: tuple[Group, ...]
    val: tuple[Group, ...]
    train: tuple[Group, ...]
    distractors: tuple[Group, ...]

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for part in ("test", "val", "train", "distractors"):
            for g in getattr(self, part):
                for p in g.photos:
                    if p in seen:
                        raise ValueError(
                            f"catalogue: photo {p} in both {seen[p]} and {part}/{g.name}"
                        )
                    seen[p] = f"{part}/{g.name}"
        names = [
            g.name for part in (self.test, self.val, self.train, self.distractors) for g in part
        ]
        if len(set(names)) != len(names):
            raise ValueError("catalogue: group names must be unique")

    def restrict(self, available: set[str]) -> Catalogue:
        """Drop unavailable photos, scenes whose query photo is missing, and groups left empty."""
        parts = {}
        for part in ("test", "val", "train", "distractors"):
            kept = []
            for g in getattr(self, part):
                idx = [i for i, p in enumerate(g.photos) if p in available]
                if not idx or (part in ("test", "val") and idx[0] != 0):
                    continue
                levels = tuple(g.level(i) for i in idx[1:]) if g.levels else ()
                kept.append(Group(g.name, tuple(g.photos[i] for i in idx), levels, g.roi))
            parts[part] = tuple(kept)
        return Catalogue(**parts)


def _s(*names: str, source: str = "opencv-doc") -> tuple[str, ...]:
    return tuple(f"{source}/{n}" for n in names)


# Curated from looking at every photo: pairs are two real views of one scene (Oxford-VGG
# graf/leuven, Middlebury stereo and flow pairs, vismatch's wide-baseline landmark pairs, a Tokyo
# 24/7 pair).
CURATED = Catalogue(
    test=(
        Group("graf", _s("graf1.png", "graf3.png"), ("easy",)),
        Group("leuven", _s("leuvenA.jpg", "leuvenB.jpg"), ("easy",)),
        Group("aero", _s("aero1.jpg", "aero3.jpg"), ("hard",)),
        Group("box", _s("box.png", "box_in_scene.png"), ("hard",), (0.02, 0.02, 0.98, 0.98)),
        Group(
            "motorcycle",
            _s("motorcycle_left.png", "motorcycle_right.png", source="skimage"),
            ("easy",),
            (0.05, 0.25, 0.95, 0.95),
        ),
        Group(
            "montmartre",
            _s("montmartre_close.jpg", "montmartre_far.jpg", source="vismatch"),
            ("easy",),
        ),
        Group("grand_central", _s("gcs_close.jpg", "gcs_far.jpg", source="vismatch"), ("hard",)),
        Group("tokyo", _s("tokyo_query.jpg", "tokyo_db.png", source="patchnetvlad"), ("hard",)),
    ),
    val=(
        Group("rubberwhale", _s("rubberwhale1.png", "rubberwhale2.png"), ("easy",)),
        Group("aloe", _s("aloeL.jpg", "aloeR.jpg"), ("easy",)),
        Group("books", _s("left.jpg", "right.jpg"), ("easy",)),
    ),
    train=(
        *(
            Group(n.split(".")[0], _s(n, source="skimage"))
            for n in (
                "astronaut.png",
                "camera.png",
                "cell.png",
                "chelsea.png",
                "clock_motion.png",
                "coffee.png",
                "coins.png",
                "grass.png",
                "gravel.png",
                "hubble_deep_field.jpg",
                "ihc.png",
                "moon.png",
                "retina.jpg",
                "rocket.jpg",
                "text.png",
            )
        ),
        *(
            Group(n.split(".")[0], _s(n))
            for n in (
                "apple.jpg",
                "baboon.jpg",
                "board.jpg",
                "butterfly.jpg",
                "chicky_512.png",
                "fruits.jpg",
                "home.jpg",
                "licenseplate_motion.jpg",
                "messi5.jpg",
                "orange.jpg",
                "smarties.png",
                "squirrel_cls.jpg",
                "stuff.jpg",
                "sudoku.png",
                "pca_test1.jpg",
            )
        ),
        *(
            Group(n.split(".")[0], _s(n, source="darknet"))
            for n in (
                "dog.jpg",
                "eagle.jpg",
                "giraffe.jpg",
                "horses.jpg",
                "person.jpg",
            )
        ),
        Group("sist_chapel", _s("sist_chapel.jpg", source="vismatch")),
        Group("pavilion", _s("visible.jpg", "thermal.jpg", source="vismatch")),
        Group("basketball", _s("basketball1.png", "basketball2.png")),
        Group("notebook", _s("ela_original.jpg", "ela_modified.jpg")),
        Group(
            "chessboard",
            _s(
                "left01.jpg",
                "right01.jpg",
                "left05.jpg",
                "right05.jpg",
                "left09.jpg",
                "right09.jpg",
            ),
        ),
    ),
    distractors=(
        Group("chartres", _s("chartres.jpg", source="vismatch")),
        Group("notre_dame", _s("notre_dame.jpg", source="vismatch")),
        Group("satellite", _s("satellite_img.jpg", source="vismatch")),
        Group("iss", _s("photo_from_iss.jpg", source="vismatch")),
        Group("building", _s("building.jpg")),
        Group("brick", _s("brick.png", source="skimage")),
        Group("kite", _s("kite.jpg", source="darknet")),
    ),
)


@dataclass(frozen=True)
class _Item:
    """One image to write, with its provenance record."""

    name: str
    group: str
    role: str  # query / db / train
    level: str  # real / easy / hard / junk (db), query, or train level
    photo: str
    seed: int | None
    params: dict | None


def build_mini_benchmark(
    assets_dir: Path,
    out_root: Path,
    *,
    seed: int = 0,
    image_max_side: int = 384,
    n_test_scenes: int | None = None,
    n_val_scenes: int | None = None,
    queries_per_scene: int = 2,
    views_per_scene: tuple[int, int, int] = (4, 4, 2),
    distractor_views: int = 12,
    train_views_per_class: int = 12,
    source_max_side: int = 1024,
    catalogue: Catalogue | None = None,
) -> dict:
    """Build mini-test, mini-val (revisitop) and mini-train (class folders) from the assets cache.

    Args:
        assets_dir: folder written by `msvlad.mini.assets.fetch_assets` (photos/ + manifest.json).
        out_root: parent folder of the three datasets and manifest.json.
        seed: master seed; every view seed is derived from it and the image's name.
        image_max_side: longest side of every written image.
        n_test_scenes, n_val_scenes: keep only the first n scenes (None: all available).
        queries_per_scene: 1 real query (the full photo with a bbx) plus mild synthetic ones.
        views_per_scene: synthetic (easy, hard, junk) db views per scene, on top of its real views.
        distractor_views: synthetic views per distractor photo, on top of the photo itself.
        train_views_per_class: images per train class (real views first, then synthetic ones).
        source_max_side: photos are downscaled to this side before views are cut from them.
        catalogue: roles of the photos (default `CURATED`, restricted to the photos present).
    Returns:
        The counts written to `<out_root>/manifest.json`.
    """
    if image_max_side < 32:
        raise ValueError(f"image_max_side: must be >= 32, got {image_max_side}")
    if queries_per_scene < 1 or train_views_per_class < 1 or min(views_per_scene) < 0:
        raise ValueError("queries_per_scene, train_views_per_class must be >= 1; views >= 0")
    assets_dir, out_root = Path(assets_dir), Path(out_root)
    manifest = read_manifest(assets_dir)
    photos = {p.photo_id: assets_dir / p.path for p in manifest.photos}
    cat = (catalogue or CURATED).restrict(set(photos))
    test = cat.test[:n_test_scenes] if n_test_scenes is not None else cat.test
    val = cat.val[:n_val_scenes] if n_val_scenes is not None else cat.val
    if not test:
        raise ValueError(f"{assets_dir}: no test scene has its photos in the assets manifest")
    if not cat.train:
        raise ValueError(f"{assets_dir}: no train class has its photos in the assets manifest")
    loader = _Loader(photos, source_max_side)
    cfg = dict(seed=seed, max_side=image_max_side, loader=loader)

    records: dict[str, list[dict]] = {}
    counts: dict[str, dict] = {}
    for ds, scenes in (("mini-test", test), ("mini-val", val)):
        if not scenes:
            log.warning("%s: no scenes available, skipped", ds)
            continue
        with atomic_dir(out_root / ds) as tmp:
            items, gnd = _build_retrieval(
                tmp,
                ds,
                scenes,
                cat.distractors,
                queries_per_scene,
                views_per_scene,
                distractor_views,
                **cfg,
            )
            with open(tmp / f"gnd_{ds}.pkl", "wb") as f:
                pickle.dump(gnd, f, protocol=PICKLE_PROTOCOL)
        records[ds] = [_record(it, f"jpg/{it.name}.jpg") for it in items]
        counts[ds] = {
            "scenes": [g.name for g in scenes],
            "queries": len(gnd["qimlist"]),
            "db": len(gnd["imlist"]),
            "distractor_groups": [g.name for g in cat.distractors],
        }
    with atomic_dir(out_root / "mini-train") as tmp:
        items = _build_train(tmp, cat.train, train_views_per_class, **cfg)
    records["mini-train"] = [_record(it, f"{it.group}/{it.name}.jpg") for it in items]
    counts["mini-train"] = {"classes": len(cat.train), "images": len(items)}

    summary = {
        "counts": counts,
        "params": {
            "seed": seed,
            "image_max_side": image_max_side,
            "queries_per_scene": queries_per_scene,
            "views_per_scene": list(views_per_scene),
            "distractor_views": distractor_views,
            "train_views_per_class": train_views_per_class,
            "source_max_side": source_max_side,
            "jpeg_quality": JPEG_QUALITY,
            "view_specs": {k: spec_record(v) for k, v in sorted(VIEW_SPECS.items())},
        },
        "assets": {
            "manifest_sha256": _sha256(assets_dir / ASSETS_MANIFEST),
            "photos": {pid: _photo_sha(manifest, pid) for pid in sorted(loader.used)},
        },
    }
    write_json(out_root / "manifest.json", {**summary, "images": records})
    total = sum(len(v) for v in records.values())
    log.info("mini benchmark in %s: %d images %s", out_root, total, counts)
    return summary


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
    loader: _Loader,
) -> tuple[list[_Item], dict]:
    """Write queries and db of one revisitop-style dataset; return the items and the gnd dict."""
    jpg = root / "jpg"
    jpg.mkdir()
    items: list[_Item] = []
    db: list[tuple[str, str, Image.Image, _Item]] = []  # (group, level, image, item)
    queries: list[tuple[str, list[float]]] = []
    scene_rois: dict[str, Box] = {}
    for g in tqdm(scenes, desc=f"{ds} scenes", leave=False):
        src = loader(g.photos[0])
        roi = _query_roi(g, src.size, _seed(seed, ds, g.name, "roi"))
        scene_rois[g.name] = roi
        for k in range(queries_per_scene):
            name = f"{g.name}_q{k}"
            if k == 0:
                img, scale = _resize(src, max_side)
                bbx = [v * scale for v in roi]
                it = _Item(name, g.name, "query", "real", g.photos[0], None, None)
            else:
                s = _seed(seed, ds, name)
                view = synthesize_view(src, VIEW_SPECS["query"], s, max_side=max_side)
                img = view.image
                bbx = _map_box(view, roi)
                it = _Item(name, g.name, "query", "query", g.photos[0], s, view.params)
            _save(img, jpg / f"{name}.jpg")
            items.append(it)
            queries.append((name, [round(float(v), 2) for v in bbx]))
        for i, pid in enumerate(g.photos[1:], start=1):
            img, _ = _resize(loader(pid), max_side)
            db.append(
                (
                    g.name,
                    g.level(i),
                    img,
                    _Item("", g.name, "db", f"real-{g.level(i)}", pid, None, None),
                )
            )
        for level, n in zip(SYNTHETIC_LEVELS, views_per_scene, strict=True):
            for j in range(n):
                # Hard views come from the real other views when there are some (viewpoint change
                # on top of the synthetic one); easy and junk views alternate over all photos.
                n_other = len(g.photos) - 1
                pidx = 1 + j % n_other if level == "hard" and n_other else j % len(g.photos)
                pid = g.photos[pidx]
                s = _seed(seed, ds, g.name, level, j)
                view = synthesize_view(
                    loader(pid),
                    VIEW_SPECS[level],
                    s,
                    max_side=max_side,
                    roi=roi if pidx == 0 else None,
                )
                db.append(
                    (g.name, level, view.image, _Item("", g.name, "db", level, pid, s, view.params))
                )
    for g in tqdm(distractors, desc=f"{ds} distractors", leave=False):
        for pid in g.photos:
            img, _ = _resize(loader(pid), max_side)
            db.append(
                (g.name, "distractor", img, _Item("", g.name, "db", "distractor", pid, None, None))
            )
        for j in range(distractor_views):
            pid = g.photos[j % len(g.photos)]
            level = SYNTHETIC_LEVELS[j % len(SYNTHETIC_LEVELS)]
            s = _seed(seed, ds, g.name, "distractor", j)
            view = synthesize_view(loader(pid), VIEW_SPECS[level], s, max_side=max_side)
            db.append(
                (
                    g.name,
                    "distractor",
                    view.image,
                    _Item("", g.name, "db", f"distractor-{level}", pid, s, view.params),
                )
            )

    # Shuffle the db with a seeded permutation so that index order carries no label.
    order = np.random.default_rng(_seed(seed, ds, "order")).permutation(len(db))
    imlist: list[str] = []
    per_group: dict[str, int] = {}
    labels: list[tuple[str, str]] = []
    for idx in order:
        group, level, img, it = db[int(idx)]
        k = per_group.get(group, 0)
        per_group[group] = k + 1
        name = f"{group}_{k:03d}"
        _save(img, jpg / f"{name}.jpg")
        imlist.append(name)
        labels.append((group, level))
        items.append(_Item(name, it.group, it.role, it.level, it.photo, it.seed, it.params))
    gnd = []
    for qname, bbx in queries:
        group = qname.rsplit("_q", 1)[0]
        ix = {
            lv: [i for i, (gr, le) in enumerate(labels) if gr == group and le == lv]
            for lv in SYNTHETIC_LEVELS
        }
        gnd.append({"easy": ix["easy"], "hard": ix["hard"], "junk": ix["junk"], "bbx": bbx})
    return items, {"imlist": imlist, "qimlist": [q for q, _ in queries], "gnd": gnd}


def _build_train(
    root: Path, classes: Sequence[Group], views: int, *, seed: int, max_side: int, loader: _Loader
) -> list[_Item]:
    """Write one folder per class: its real photos, then seeded easy/hard synthetic views."""
    items = []
    for g in tqdm(classes, desc="mini-train classes", leave=False):
        (root / g.name).mkdir()
        for k in range(views):
            name = f"{k:02d}"
            pid = g.photos[k % len(g.photos)]
            if k < len(g.photos):
                img, _ = _resize(loader(pid), max_side)
                it = _Item(name, g.name, "train", "real", pid, None, None)
            else:
                level = TRAIN_LEVELS[k % len(TRAIN_LEVELS)]
                s = _seed(seed, "mini-train", g.name, k)
                view = synthesize_view(loader(pid), VIEW_SPECS[level], s, max_side=max_side)
                img = view.image
                it = _Item(name, g.name, "train", level, pid, s, view.params)
            _save(img, root / g.name / f"{name}.jpg")
            items.append(it)
    return items


# -------------------------------------------------------------------------------- helpers


class _Loader:
    """Open photos once, upright, RGB, downscaled to `max_side`; records which ids were used."""

    def __init__(self, paths: dict[str, Path], max_side: int) -> None:
        self.paths, self.max_side = paths, max_side
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
        img, _ = _resize(img, self.max_side)
        return img


def _resize(img: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """Downscale so the longest side is at most `max_side`; returns the image and the scale."""
    scale = min(1.0, max_side / max(img.size))
    if scale == 1.0:
        return img.copy(), 1.0
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    out = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return out, out.width / img.width


def _query_roi(g: Group, size: tuple[int, int], seed: int) -> Box:
    """Query region in source pixels: curated fractions, or a seeded central box of 40-70 % area."""
    w, h = size
    if g.roi is not None:
        x1, y1, x2, y2 = g.roi
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


def _save(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    path.write_bytes(buf.getvalue())


def _seed(*parts: object) -> int:
    """Stable 63-bit seed from a tuple of names (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _record(it: _Item, file: str) -> dict:
    rec = {"file": file, "group": it.group, "role": it.role, "level": it.level, "photo": it.photo}
    if it.seed is not None:
        rec["seed"] = it.seed
        rec["params"] = it.params
    return rec


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _photo_sha(manifest: Manifest, photo_id: str) -> str:
    return manifest.by_id()[photo_id].sha256
