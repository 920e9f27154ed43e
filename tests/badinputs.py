"""A tiny world for the bad-input corpus: data, a whitened checkpoint, params and earlier outputs.

`make_world(root)` writes
  data/test/   revisitop layout, 3 queries (bbx), 9 database images (64 px)
  data/val/    the same layout, a second set
  data/train/  4 classes of 4 images
  model.pt     an untrained MS-NetVLAD (K=4) with a PCA-whitening to 8-d
  params.yaml  the repo's params with data.root -> data/, 64 px, one scale, tiny budgets
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from msvlad.config import load_params
from msvlad.nn.model import build_model, save_model
from msvlad.nn.whitening import Whitening
from tinydata import make_retrieval_set, make_train_set

REPO = Path(__file__).resolve().parents[1]


@dataclass
class World:
    """Where the tiny world lives."""

    root: Path
    data: Path
    params: Path
    model: Path

    @property
    def gnd(self) -> Path:
        return self.data / "test" / "gnd_test.pkl"

    @property
    def jpg(self) -> Path:
        return self.data / "test" / "jpg"

    @property
    def out(self) -> Path:
        """An evaluation output folder of this world."""
        return self.root / "out"

    def args(self, *extra: str) -> list[str]:
        """--params of this world, then `extra`."""
        return ["--params", str(self.params), *extra]


def tiny_params(data: Path) -> dict:
    """The repo's params.yaml on the tiny data: 64 px, K=4, one test scale, tiny budgets."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["base"]["device"] = "cpu"
    raw["data"].update(root=str(data), train_set="train", val_set="val", test_sets=["test"])
    raw["model"].update(image_size=64, num_clusters=4, pretrained=False)
    raw["cluster"].update(num_images=16, max_locals=2000)
    raw["miner"].update(pool_size=16, images_per_class=4, triplets_per_round=6, delta=1.0)
    raw["train"].update(
        steps_per_epoch=2, epochs=2, checkpoint_every=2, warmup_steps=1, frozen_stages=0
    )
    raw["whiten"].update(num_images=16, dim=8)
    raw["extract"].update(scales=[1.0], batch_size=16, image_size=None, resize=None)
    return raw


def make_world(root: Path) -> World:
    """Write the world under `root`."""
    data = root / "data"
    make_train_set(data / "train", num_classes=4, per_class=4, size=48)
    make_retrieval_set(data, "test", num_scenes=3, db_per_scene=3, size=64, seed=3)
    make_retrieval_set(data, "val", num_scenes=2, db_per_scene=2, size=64, seed=4)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(data)))
    torch.manual_seed(0)
    model = build_model(load_params(params).model)
    model.whitening = Whitening.fit(torch.randn(40, model.raw_dim), 8)
    return World(root, data, params, save_model(model, root / "model.pt"))


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (empty if it does not exist)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
