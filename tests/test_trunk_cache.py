"""Frozen-trunk cache on disk: computed once per content key, reused exactly, rebuilt when stale."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from msvlad.config import ModelConfig
from msvlad.nn.model import build_model
from msvlad.training.trunk_cache import FrozenTrunkCache, trunk_store_dir
from tinydata import make_train_set


@pytest.fixture
def setup(tmp_path):
    make_train_set(tmp_path / "train", num_classes=2, per_class=3, size=48)
    paths = sorted((tmp_path / "train").rglob("*.jpg"))
    (paths[1]).write_text("not an image")  # an unreadable image is remembered as such
    model = build_model(ModelConfig(pretrained=False, num_clusters=4, image_size=32))
    return model, paths, tmp_path / "store"


def _cache(model, paths, store, stages=3, size=32):
    return FrozenTrunkCache(
        model,
        stages,
        paths,
        image_size=size,
        batch_size=4,
        device=torch.device("cpu"),
        store=store,
    )


def test_the_store_returns_exactly_what_was_computed(setup, monkeypatch):
    model, paths, store = setup
    built = _cache(model, paths, store)
    assert len(list(store.glob("*.pt"))) == 1
    assert built.ok.tolist() == [i != 1 for i in range(len(paths))]
    calls = []
    monkeypatch.setattr(model.backbone, "trunk", lambda *a: calls.append(a))  # must not run
    again = _cache(model, paths, store)
    assert not calls
    assert torch.equal(again.features, built.features) and np.array_equal(again.ok, built.ok)
    monkeypatch.undo()
    direct = FrozenTrunkCache(
        model, 3, paths, image_size=32, batch_size=4, device=torch.device("cpu")
    )
    assert torch.equal(direct.features, built.features)


def test_another_key_for_other_weights_stages_size_or_files(setup):
    model, paths, store = setup
    base = _cache(model, paths, store).key(paths, 32)
    c = _cache(model, paths, store)
    assert c.key(paths, 64) != base
    assert _cache(model, paths, store, stages=2).key(paths, 32) != base
    os.utime(paths[0], ns=(1, 1))  # a file replaced in place
    assert c.key(paths, 32) != base
    with torch.no_grad():
        next(iter(model.backbone.stages[0].parameters())).add_(1.0)
    assert c.key(paths, 32) not in (base, _cache(model, paths, store).key(paths[:1], 32))
    later = model.backbone.stages[5]  # a trained (not frozen) stage does not change the key
    key = c.key(paths, 32)
    with torch.no_grad():
        next(iter(later.parameters())).add_(1.0)
    assert c.key(paths, 32) == key


def test_a_damaged_store_file_is_rebuilt(setup):
    model, paths, store = setup
    built = _cache(model, paths, store)
    (file,) = store.glob("*.pt")
    file.write_bytes(b"garbage")
    again = _cache(model, paths, store)
    assert torch.equal(again.features, built.features)
    assert file.stat().st_size > 100  # written again


def test_store_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MSVLAD_CACHE", str(tmp_path / "c"))
    assert trunk_store_dir() == tmp_path / "c" / "trunk"
    monkeypatch.delenv("MSVLAD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert trunk_store_dir() == tmp_path / "x" / "msvlad" / "trunk"
