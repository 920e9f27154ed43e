"""Pure math of the network against independent, hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msvlad.nn import functional as LF


def test_l2n_unit_norm_and_zero_safe(gen):
    x = torch.randn(5, 7, generator=gen)
    assert torch.allclose(LF.l2n(x).norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.isfinite(LF.l2n(torch.zeros(2, 3))).all()


def test_mac_spoc_gem_hand_computed():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    assert LF.mac(x).item() == 4.0
    assert LF.spoc(x).item() == 2.5
    # GeM p=2: sqrt((1 + 4 + 9 + 16) / 4) = sqrt(7.5)
    assert LF.gem(x, 2.0).item() == pytest.approx(7.5**0.5, rel=1e-6)
    # p=1 is SPoC
    assert LF.gem(x, 1.0).item() == pytest.approx(2.5, rel=1e-6)


def test_rmac_regions_square_map():
    # 4x4 map: level 1 -> one 4x4 region; level 2 -> side floor(8/3)=2, 2x2 grid;
    # level 3 -> side 2, 3x3 grid
    regions = LF.rmac_regions(4, 4, levels=3)
    assert (0, 0, 4) in regions
    sides = sorted({r[2] for r in regions})
    assert sides == [2, 4]
    assert len(regions) == 1 + 4 + 9


def test_rmac_hand_computed_2x2():
    # 2x2 map, one channel pair. Regions: level 1 side 2 (whole map); level 2 side 1 at 4 corners;
    # level 3 side floor(4/4)=1 at starts clipped to 0/1 by the grid rule.
    x = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
    expected = LF.l2n(LF.mac(x))  # whole-map MAC [1, 2] normalised
    for top, left, side in LF.rmac_regions(2, 2, 3):
        region = x[..., top : top + side, left : left + side]
        expected = expected + LF.l2n(region.amax(dim=(-2, -1)))
    assert torch.allclose(LF.rmac(x), expected)
    # the corner region (0, 0) sees only channel 0 -> contributes [1, 0]
    assert any(r[:2] == (0, 0) and r[2] == 1 for r in LF.rmac_regions(2, 2, 3))


def test_multiscale_bag_size_formula(gen):
    b, c, h, w, split = 2, 1024, 6, 5, 512
    fmap = torch.randn(b, c, h, w, generator=gen)
    bag = LF.multiscale_local_features(fmap, (2, 3), split)
    n = (c // split) * ((h - 1) * (w - 1) + (h - 2) * (w - 2))
    assert bag.shape == (b, n, split)
    assert LF.bag_size(c, h, w, (2, 3), split) == n
    assert torch.allclose(bag.norm(dim=-1), torch.ones(b, n), atol=1e-5)


def test_multiscale_bag_content_is_pooled_chunks(gen):
    fmap = torch.randn(1, 8, 4, 4, generator=gen)
    bag = LF.multiscale_local_features(fmap, (2,), split=4)
    pooled = F.max_pool2d(fmap, 2, stride=1)  # (1, 8, 3, 3)
    # location (1, 2), second chunk = channels 4..7
    loc = 1 * 3 + 2
    expected = LF.l2n(pooled[0, 4:8, 1, 2])
    assert torch.allclose(bag[0, loc * 2 + 1], expected, atol=1e-6)


def test_multiscale_no_split_when_channels_small(gen):
    fmap = torch.randn(1, 320, 5, 5, generator=gen)
    assert LF.multiscale_local_features(fmap, (2, 3), 512).shape == (1, 16 + 9, 320)


def test_multiscale_bad_split_and_tiny_map(gen):  # noqa: ARG001
    with pytest.raises(ValueError, match="split=300"):
        LF.multiscale_local_features(torch.randn(1, 1024, 4, 4), (2, 3), 300)
    # a map smaller than every window falls back to the largest window that fits
    # (here 1x1, i.e. the 1x4 raw cells)
    tiny = torch.randn(1, 8, 1, 4)
    assert torch.allclose(
        LF.multiscale_local_features(tiny, (2, 3), None)[0], LF.l2n(tiny[0, :, 0].t())
    )
    assert LF.bag_size(8, 1, 4, (2, 3), None) == 4
    # a 2x2 map keeps the 2x2 scale only
    assert LF.multiscale_local_features(torch.randn(1, 8, 2, 2), (2, 3), None).shape == (1, 1, 8)


def _netvlad_reference(local, centroids, weight, bias):
    """Direct per-cluster formula: V_k = sum_i a_k(x_i)(x_i - c_k), intra-norm, flatten, L2."""
    out = []
    for b in range(local.shape[0]):
        logits = local[b] @ weight.t() + bias
        a = torch.softmax(logits, dim=1)
        vs = []
        for k in range(centroids.shape[0]):
            v = torch.zeros(local.shape[2], dtype=local.dtype)
            for i in range(local.shape[1]):
                v = v + a[i, k] * (local[b, i] - centroids[k])
            vs.append(v / (v.norm() + 1e-6))
        flat = torch.cat(vs)
        out.append(flat / (flat.norm() + 1e-6))
    return torch.stack(out)


def test_netvlad_matches_per_cluster_formula(gen):
    local = LF.l2n(torch.randn(2, 7, 5, generator=gen))
    centroids = torch.randn(4, 5, generator=gen)
    weight = torch.randn(4, 5, generator=gen)
    bias = torch.randn(4, generator=gen)
    out = LF.netvlad(local, centroids, weight, bias)
    assert out.shape == (2, 20)
    assert torch.allclose(out, _netvlad_reference(local, centroids, weight, bias), atol=1e-5)


def test_netvlad_norms(gen):
    local = LF.l2n(torch.randn(3, 11, 6, generator=gen))
    c = torch.randn(4, 6, generator=gen)
    w, b = LF.netvlad_params_from_centroids(c, 1.0)  # soft enough that every cluster gets mass
    out = LF.netvlad(local, c, w, b)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    blocks = out.view(3, 4, 6).norm(dim=-1)  # intra-normalised blocks share the global scale
    assert torch.allclose(blocks, torch.full((3, 4), 0.5), atol=1e-3)


def test_decoupled_init_equals_distance_softmax(gen):
    # with w = 2ac and b = -a|c|^2, softmax(w.x + b) == softmax(-a |x - c|^2) (|x|^2 cancels)
    x = torch.randn(9, 5, generator=gen)
    c = torch.randn(3, 5, generator=gen)
    w, b = LF.netvlad_params_from_centroids(c, 2.0)
    a1 = torch.softmax(x @ w.t() + b, dim=1)
    a2 = torch.softmax(-2.0 * torch.cdist(x, c).pow(2), dim=1)
    assert torch.allclose(a1, a2, atol=1e-5)


def test_netvlad_grouped_is_concat_of_groups(gen):
    local = LF.l2n(torch.randn(2, 3, 6, 4, generator=gen))  # (B, G, N, D)
    c = torch.randn(3, 2, 4, generator=gen)
    w = torch.randn(3, 2, 4, generator=gen)
    b = torch.randn(3, 2, generator=gen)
    out = LF.netvlad_grouped(local, c, w, b)
    parts = [LF.netvlad(local[:, g], c[g], w[g], b[g]) for g in range(3)]
    assert torch.allclose(out, LF.l2n(torch.cat(parts, dim=1)), atol=1e-5)


def test_alpha_v1_ratio(gen):
    # one descriptor, two centroids: gap between dot products is known
    d = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # dots 1 and 0 -> gap 1
    assert LF.netvlad_alpha_v1(d, c) == pytest.approx(math.log(100.0), rel=1e-5)


def test_gradcheck_netvlad_double(gen):
    local = LF.l2n(torch.randn(1, 4, 3, generator=gen, dtype=torch.float64))
    params = [
        torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)
    ]
    bias = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    local.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, c, w, b: LF.netvlad(x, c, w, b), (local, params[0], params[1], bias)
    )


def test_gradcheck_gem_double(gen):
    x = torch.rand(1, 2, 3, 3, generator=gen, dtype=torch.float64) + 0.1
    p = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, q: LF.gem(a, q), (x, p))


def test_pca_whitening_identity_covariance(gen):
    x = torch.randn(500, 8, generator=gen) @ torch.randn(8, 8, generator=gen) + 3.0
    mean, proj, evals = LF.fit_pca_whitening(x, dim=6)
    y = (x - mean) @ proj
    cov = torch.cov(y.t())
    assert torch.allclose(cov, torch.eye(6), atol=1e-3)
    assert (evals[:-1] >= evals[1:]).all()


def test_pca_whitening_dual_path_matches_primal(gen):
    # N - 1 < D uses the Gram-matrix route; covariance must still be identity on the training set
    x = torch.randn(20, 50, generator=gen)
    mean, proj, _ = LF.fit_pca_whitening(x, dim=10)
    y = (x - mean) @ proj
    assert torch.allclose(torch.cov(y.t()), torch.eye(10), atol=1e-3)
    with pytest.raises(ValueError, match="whitening dim 30"):
        LF.fit_pca_whitening(x, dim=30)
