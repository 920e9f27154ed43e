"""Tiny generated datasets in the project's layouts (class folders; revisitop) for fast tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour pattern (one 'landmark')."""
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)


def _view(base: np.ndarray, rng: np.random.Generator, noise: float = 12.0) -> Image.Image:
    """A jittered view: shifted, noisy copy of a pattern."""
    shift = rng.integers(-4, 5, size=2)
    img = np.roll(base, tuple(shift), axis=(0, 1)) + rng.normal(0, noise, base.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_train_set(
    root: Path, num_classes: int = 6, per_class: int = 5, size: int = 48, seed: int = 0
) -> Path:
    """Class-folder training set ROOT/<class>/<k>.jpg."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        base = _pattern(rng, size)
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            _view(base, rng).save(root / f"class{c:02d}" / f"{k}.jpg", quality=95)
    return root


def make_retrieval_set(
    data_root: Path,
    name: str,
    num_scenes: int = 4,
    db_per_scene: int = 3,
    size: int = 48,
    seed: int = 1,
) -> Path:
    """Revisitop-layout dataset: one query per scene, db views (first easy, rest hard), no junk."""
    rng = np.random.default_rng(seed)
    folder = data_root / name
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    imlist, qimlist, gnd = [], [], []
    for s in range(num_scenes):
        base = _pattern(rng, size)
        qname = f"q{s}"
        _view(base, rng).save(folder / "jpg" / f"{qname}.jpg", quality=95)
        ids = []
        for k in range(db_per_scene):
            imlist.append(f"s{s}_{k}")
            _view(base, rng).save(folder / "jpg" / f"s{s}_{k}.jpg", quality=95)
            ids.append(len(imlist) - 1)
        qimlist.append(qname)
        gnd.append(
            {
                "easy": ids[:1],
                "hard": ids[1:],
                "junk": [],
                "bbx": [0.0, 0.0, float(size), float(size)],
            }
        )
    with (folder / f"gnd_{name}.pkl").open("wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, fh)
    return folder
