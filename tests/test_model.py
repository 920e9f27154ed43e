"""The assembled network: dims, frozen BN, gradients, whitening, checkpoint round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from msvlad.config import ModelConfig
from msvlad.nn.model import build_model, load_model, save_model
from msvlad.nn.whitening import Whitening


def _cfg(**kw) -> ModelConfig:
    base = dict(
        backbone="efficientnet_lite0", pooling="msvlad", split=160, num_clusters=4, image_size=96
    )
    base.update(kw)
    return ModelConfig(**base)


def test_forward_dims_cpu(gen):
    model = build_model(_cfg(), pretrained=False).eval()
    out = model(torch.rand(2, 3, 96, 96, generator=gen))
    assert out.shape == (2, 4 * 160) and model.raw_dim == 640
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_bn_statistics_frozen_in_train_mode(gen):
    model = build_model(_cfg(), pretrained=False).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(not m.training for m in bns)
    before = bns[0].running_mean.clone()
    model(torch.rand(2, 3, 64, 64, generator=gen))
    assert torch.equal(before, bns[0].running_mean)


def test_gradients_reach_backbone_and_netvlad(gen):
    model = build_model(_cfg(), pretrained=False).train()
    a, p, n = model(torch.rand(3, 3, 64, 64, generator=gen))
    loss = (a - p).pow(2).sum() - (a - n).pow(2).sum()
    loss.backward()
    pool = model.pooling
    for name, t in [("centroids", pool.centroids), ("weight", pool.weight), ("bias", pool.bias)]:
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    stem = next(model.backbone.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["gem", "mac", "spoc", "rmac", "netvlad", "vlad_concat"])
def test_every_pooling_builds_and_runs(pooling, gen):
    model = build_model(_cfg(pooling=pooling), pretrained=False).eval()
    out = model(torch.rand(1, 3, 96, 96, generator=gen))
    assert out.shape == (1, model.raw_dim)


def test_checkpoint_round_trip_with_whitening(tmp_path, gen):
    model = build_model(_cfg(), pretrained=False).eval()
    model.whitening = Whitening.fit(torch.randn(50, model.raw_dim, generator=gen), dim=16)
    x = torch.rand(2, 3, 96, 96, generator=gen)
    expected = model.whiten(model(x))
    path = save_model(model, tmp_path / "m.pt", step=3)
    loaded = load_model(path).eval()
    assert loaded.config == model.config and loaded.out_dim == 16
    assert torch.allclose(loaded.whiten(loaded(x)), expected, atol=1e-6)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_model(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a msvlad model"):
        load_model(tmp_path / "other.pt")


def test_config_is_dataclass_frozen():
    cfg = _cfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backbone = "resnet50"
