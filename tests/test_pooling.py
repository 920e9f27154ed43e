"""Pooling modules: equal to their functional forms, correct dims, trainable where needed."""

from __future__ import annotations

import pytest
import torch

from msvlad.nn import functional as LF
from msvlad.nn.pooling import MAC, RMAC, GeM, NetVLAD, SPoC, VLADConcat, build_pooling


def test_global_poolings_match_functional(gen):
    x = torch.rand(2, 16, 5, 4, generator=gen)
    assert torch.allclose(MAC(16)(x), LF.l2n(LF.mac(x)))
    assert torch.allclose(SPoC(16)(x), LF.l2n(LF.spoc(x)))
    assert torch.allclose(GeM(16, 3.0)(x), LF.l2n(LF.gem(x, 3.0)), atol=1e-6)
    assert torch.allclose(RMAC(16)(x), LF.l2n(LF.rmac(x)))
    assert "p=3.0000" in repr(GeM(16))


def test_gem_p_is_learnable(gen):
    pool = GeM(4)
    pool(torch.rand(1, 4, 3, 3, generator=gen)).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs() > 0


def test_msvlad_dims_and_output(gen):
    pool = NetVLAD(1024, num_clusters=8, pool_sizes=(2, 3), split=512)
    x = torch.rand(2, 1024, 5, 5, generator=gen)
    out = pool(x)
    assert out.shape == (2, 8 * 512) and pool.out_dim == 8 * 512
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert pool.local_features(x).shape == (2, 2 * (16 + 9), 512)
    expected = LF.netvlad(pool.local_features(x), pool.centroids, pool.weight, pool.bias)
    assert torch.allclose(out, expected)


def test_init_from_centroids_sets_decoupled_params(gen):
    pool = NetVLAD(16, num_clusters=4, split=None, alpha=30.0)
    c = torch.randn(4, 16, generator=gen)
    pool.init_from_centroids(c)
    assert torch.allclose(pool.centroids, c)
    assert torch.allclose(pool.weight, 60.0 * c)
    assert torch.allclose(pool.bias, -30.0 * c.pow(2).sum(1))
    with pytest.raises(ValueError, match="expected"):
        pool.init_from_centroids(torch.randn(3, 16))


def test_vlad_concat_groups(gen):
    pool = VLADConcat(1024, num_clusters=4, pool_sizes=(2,), split=512)
    assert pool.out_dim == 2 * 4 * 512
    pool.init_from_centroids(torch.randn(4, 512, generator=gen))
    out = pool(torch.rand(1, 1024, 3, 3, generator=gen))
    assert out.shape == (1, 4096)
    assert torch.allclose(out.norm(), torch.tensor(1.0), atol=1e-5)


def test_build_pooling_names():
    assert isinstance(build_pooling("netvlad", 64, num_clusters=4), NetVLAD)
    assert build_pooling("netvlad", 64, num_clusters=4).pool_sizes == (1,)
    assert build_pooling("msvlad", 1024, num_clusters=4, split=512).out_dim == 2048
    with pytest.raises(ValueError, match="unknown pooling"):
        build_pooling("avg", 8)
    with pytest.raises(ValueError, match="split=300"):
        build_pooling("msvlad", 1024, split=300)
