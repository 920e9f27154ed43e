"""The fused multi-scale NetVLAD equals the bag-building path it replaced, values and gradients.

`multiscale_netvlad` is compared with `netvlad(multiscale_local_features(...))` (and
`netvlad_grouped` of the per-group bags) in float64, where only the summation order differs, for
every normalisation, both bias initialisations, split and no split, channels-last and NCHW maps,
and maps too small for a window; the chained 2 x 2 max-pools equal the s x s max-pool exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msvlad.nn import functional as LF
from msvlad.nn.pooling import NetVLAD, VLADConcat, build_pooling

F64 = {"rtol": 1e-10, "atol": 1e-12}


def _params(k: int, d: int, bias_init: str, gen: torch.Generator, groups: int = 0):
    shape = (groups, k, d) if groups else (k, d)
    c = torch.randn(*shape, generator=gen, dtype=torch.float64)
    w, b = LF.netvlad_params_from_centroids(LF.l2n(c), 3.0, bias_init)
    return c, w + 0.1 * torch.randn(*shape, generator=gen, dtype=torch.float64), b


def _unfused(fmap, c, w, b, pool_sizes, split, norm="intra"):
    """The path before fusion: build the L2-normalised bag, then NetVLAD."""
    if w.dim() == 3:
        d = fmap.shape[1] // w.shape[0]
        bags = [
            LF.multiscale_local_features(fmap[:, g * d : (g + 1) * d], pool_sizes, None)
            for g in range(w.shape[0])
        ]
        return LF.netvlad_grouped(torch.stack(bags, dim=1), c, w, b, norm=norm)
    return LF.netvlad(LF.multiscale_local_features(fmap, pool_sizes, split), c, w, b, norm=norm)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 5), (6, 6), (9, 4)])
@pytest.mark.parametrize("pool_sizes", [(2, 3), (1,), (3, 2, 4), (2, 2)])
def test_chained_max_pools_equal_the_window_pools_exactly(gen, size, pool_sizes):
    x = torch.randn(2, 3, *size, generator=gen)
    x[:, :, : size[0] // 2] = 0.0  # ties, as after a ReLU
    got = LF.pooled_maps(x, pool_sizes)
    fits = [s for s in pool_sizes if s <= min(size)] or [min(size)]
    assert len(got) == len(fits)
    for s, m in zip(fits, got, strict=True):
        assert torch.equal(m, x if s == 1 else F.max_pool2d(x, s, stride=1))


@pytest.mark.parametrize("norm", ["intra", "across_clusters"])
@pytest.mark.parametrize("bias_init", ["squared_norm", "norm"])
@pytest.mark.parametrize(
    ("channels", "split", "pool_sizes", "size"),
    [
        (8, 4, (2, 3), (5, 6)),  # the paper's layout: 2 chunks, two scales
        (8, None, (1,), (4, 3)),  # plain single-scale NetVLAD on raw cells
        (6, 6, (2, 3, 4), (4, 4)),  # no split, a window that just fits
        (8, 4, (2, 3), (2, 7)),  # the 3 x 3 window does not fit
        (4, 2, (3,), (1, 5)),  # no window fits: the largest that does
    ],
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_equals_bag_then_netvlad(
    gen, norm, bias_init, channels, split, pool_sizes, size, channels_last
):
    fmap = torch.relu(torch.randn(3, channels, *size, generator=gen, dtype=torch.float64))
    if channels_last:
        fmap = fmap.contiguous(memory_format=torch.channels_last)
    d = channels if split is None or channels <= split else split
    c, w, b = _params(5, d, bias_init, gen)
    got = LF.multiscale_netvlad(fmap, c, w, b, pool_sizes, split, norm=norm)
    torch.testing.assert_close(got, _unfused(fmap, c, w, b, pool_sizes, split, norm), **F64)


@pytest.mark.parametrize("norm", ["intra", "across_clusters"])
def test_fused_grouped_equals_per_group_bags(gen, norm):
    fmap = torch.relu(torch.randn(2, 9, 5, 4, generator=gen, dtype=torch.float64))
    c, w, b = _params(4, 3, "norm", gen, groups=3)
    got = LF.multiscale_netvlad(fmap, c, w, b, (2, 3), 3, norm=norm)
    torch.testing.assert_close(got, _unfused(fmap, c, w, b, (2, 3), 3, norm), **F64)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("norm", ["intra", "across_clusters"])
def test_fused_gradients_equal_the_unfused_ones(gen, grouped, norm):
    # a tie-free map (strictly positive, distinct): max-pool gradients go to unique maxima
    fmap = torch.rand(2, 6, 5, 4, generator=gen, dtype=torch.float64) + 0.5
    fmap = fmap.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    c, w, b = _params(3, 3, "squared_norm", gen, groups=2 if grouped else 0)
    leaves = [t.requires_grad_(True) for t in (c, w, b)]
    probe = torch.randn(2, 2 * 9 if grouped else 9, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (LF.multiscale_netvlad, _unfused):
        out = fn(fmap, c, w, b, (2, 3), 3, norm=norm)
        grads.append(torch.autograd.grad((out * probe).sum(), [fmap, *leaves]))
    for g_fused, g_ref in zip(*grads, strict=True):
        torch.testing.assert_close(g_fused, g_ref, **F64)


def test_gradcheck_fused_double(gen):
    fmap = (torch.rand(1, 4, 3, 4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    c, w, b = (t.requires_grad_(True) for t in _params(2, 2, "norm", gen))
    fn = lambda x, c_, w_, b_: LF.multiscale_netvlad(x, c_, w_, b_, (2, 3), 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (fmap, c, w, b))


@pytest.mark.parametrize("cls", [NetVLAD, VLADConcat])
def test_modules_use_the_fused_path_with_their_bag(gen, cls):
    torch.manual_seed(0)
    pool = cls(8, num_clusters=3, pool_sizes=(2, 3), split=4, alpha=2.0, norm="across_clusters")
    pool = pool.double()
    fmap = torch.randn(2, 8, 4, 5, generator=gen, dtype=torch.float64)
    out = pool(fmap)
    if cls is NetVLAD:
        ref = LF.netvlad(
            pool.local_features(fmap),
            pool.centroids,
            pool.weight,
            pool.bias,
            norm="across_clusters",
        )
    else:
        ref = LF.netvlad_grouped(
            pool.grouped_local_features(fmap),
            pool.centroids,
            pool.weight,
            pool.bias,
            norm="across_clusters",
        )
    assert out.shape == (2, pool.out_dim)
    torch.testing.assert_close(out, ref, **F64)


def test_float32_autocast_free_outputs_match_closely(gen):
    """At the mini profile's shape in float32: the change is summation order only."""
    pool = build_pooling("msvlad", 320, num_clusters=32, split=160).eval()
    fmap = torch.relu(torch.randn(4, 320, 7, 7, generator=gen))
    fmap = fmap.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = LF.netvlad(pool.local_features(fmap), pool.centroids, pool.weight, pool.bias)
        torch.testing.assert_close(pool(fmap), ref, rtol=1e-5, atol=2e-6)


def test_bad_split_is_refused(gen):
    c, w, b = _params(2, 3, "norm", gen)
    with pytest.raises(ValueError, match="split=3 must divide"):
        LF.multiscale_netvlad(torch.randn(1, 8, 3, 3, generator=gen), c, w, b, (2,), 3)
