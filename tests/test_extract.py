"""Extraction: batching never changes a descriptor, multi-scale sums, broken images are skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from msvlad.config import ModelConfig
from msvlad.evaluation.extract import (
    ImageItem,
    describe_and_whiten,
    describe_images,
    load_resized,
    target_size,
)
from msvlad.nn import functional as LF
from msvlad.nn.model import build_model
from msvlad.nn.whitening import Whitening


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="efficientnet_lite0", pooling="gem", image_size=64)
    return build_model(cfg, pretrained=False).eval()


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(80, 60), (60, 80), (80, 60), (70, 70), (80, 60)]):
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_target_size_policies():
    assert target_size(400, 300, 200, "square") == (200, 200)
    assert target_size(400, 300, 200, "max_side") == (200, 150)
    assert target_size(300, 400, 200, "max_side") == (150, 200)


@pytest.mark.parametrize("policy", ["square", "max_side"])
def test_batched_equals_one_by_one(model, images, policy):
    items = [ImageItem(p) for p in images]
    batched, ok = describe_images(model, items, image_size=64, resize=policy, batch_size=4)
    assert ok.all()
    for i, item in enumerate(items):
        with torch.no_grad():
            single = model(load_resized(item, 64, policy)[None])[0]
        assert torch.allclose(batched[i], single, atol=1e-5), i


def test_query_crop_before_resize(model, images):
    item = ImageItem(images[0], bbx=(10.0, 5.0, 50.0, 45.0))
    x = load_resized(item, 64, "max_side")
    assert x.shape == (3, 64, 64)  # the 40x40 crop, resized
    full = np.asarray(
        Image.open(images[0]).convert("RGB").crop((10, 5, 50, 45)).resize((64, 64), Image.BILINEAR)
    )
    assert torch.allclose(x, torch.from_numpy(full.copy()).permute(2, 0, 1).float() / 255)


def test_multiscale_sum_then_whiten(model, images):
    items = [ImageItem(p) for p in images]
    a, _ = describe_images(model, items, image_size=64)
    b, _ = describe_images(model, items, image_size=45)
    out, failed = describe_and_whiten(model, items, image_size=64, scales=[1.0, 0.7], whiten=False)
    assert failed == []
    assert np.allclose(out, LF.l2n(a + b).numpy(), atol=1e-6)
    model.whitening = Whitening.fit(torch.randn(40, model.raw_dim), dim=8)
    try:
        w, _ = describe_and_whiten(model, items, image_size=64, scales=[1.0, 0.7])
        assert w.shape == (5, 8) and w.dtype == np.float32
        assert np.allclose(w, model.whiten(LF.l2n(a + b)).numpy(), atol=1e-5)
    finally:
        model.whitening = None


def test_broken_image_is_logged_and_skipped(model, images, tmp_path, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:200])  # truncated JPEG
    items = [
        ImageItem(images[0]),
        ImageItem(broken),
        ImageItem(tmp_path / "missing.jpg"),
        ImageItem(images[1]),
    ]
    out, failed = describe_and_whiten(model, items, image_size=64, resize="max_side")
    assert failed == [1, 2]
    assert np.all(out[1] == 0) and np.all(out[2] == 0)
    assert np.allclose(np.linalg.norm(out[[0, 3]], axis=1), 1.0, atol=1e-5)
    assert "broken.jpg" in caplog.text and "missing.jpg" in caplog.text
