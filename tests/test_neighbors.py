"""topk_neighbors against a full float64 argsort on every path, with exact ties and failures.

Paths: "dense" (the torch backend on the CPU: float64 blocks of the whole matrix), "candidates"
(torch float32 candidates + float64 re-scoring: the torch backend on CUDA, run here on the CPU) and
"faiss" (IndexFlatIP candidates + the same re-scoring).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from msvlad.mining import neighbors
from msvlad.mining.neighbors import similarity_rows, topk_neighbors


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _hypercube(n: int, seed: int, d: int = 8) -> torch.Tensor:
    """Rows in {+-1/sqrt(d)}^d: every product has the same magnitude, so equal sums tie exactly."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1
    return signs / float(np.sqrt(d))


def _reference(x: torch.Tensor, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Full N x N float64 matrix, full sort by (similarity desc, index asc)."""
    s = x.double().numpy() @ x.double().numpy().T
    n = s.shape[0]
    if exclude_self:
        s[np.arange(n), np.arange(n)] = -np.inf
    cols = np.broadcast_to(np.arange(n), s.shape)
    order = np.lexsort((cols, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


PATHS = ["dense", "candidates", "faiss"]


def _topk(
    path: str, x: torch.Tensor, k: int, *, exclude_self: bool = True, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_neighbors through one path (the torch candidates path is CUDA's; forced here)."""
    if path == "candidates":
        return neighbors._candidate_topk(x, k, chunk_size, exclude_self, "torch")
    backend = "torch" if path == "dense" else "faiss"
    return topk_neighbors(x, k, exclude_self=exclude_self, backend=backend, chunk_size=chunk_size)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize(
    ("n", "d", "k", "chunk"), [(60, 5, 7, 13), (150, 16, 30, 4096), (40, 3, 39, 1)]
)
def test_matches_full_argsort(
    path: str, exclude_self: bool, n: int, d: int, k: int, chunk: int
) -> None:
    x = _unit(n, d, seed=n + d)
    x[3] = x[10]  # duplicated rows: exact ties
    x[4] = x[10]
    k = min(k, n - int(exclude_self))
    sims, idx = _topk(path, x, k, exclude_self=exclude_self, chunk_size=chunk)
    ref_s, ref_i = _reference(x, k, exclude_self)
    assert sims.shape == (n, k) and idx.shape == (n, k)
    assert sims.dtype == torch.float64 and idx.dtype == torch.int64
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(sims.numpy(), ref_s, rtol=0, atol=1e-12)
    if exclude_self:
        assert not (idx == torch.arange(n)[:, None]).any()


@pytest.mark.parametrize("path", PATHS)
def test_exact_ties_break_by_lower_index(path: str, caplog: pytest.LogCaptureFixture) -> None:
    # 8-d sign vectors have only 9 distinct similarities: ties at every rank and at the cut,
    # which also exercises the candidate paths' full-row fallback
    x = _hypercube(120, seed=1)
    caplog.set_level(logging.DEBUG, logger="msvlad.mining.neighbors")
    sims, idx = _topk(path, x, 25, chunk_size=32)
    _, ref_i = _reference(x, 25, True)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    equal = sims[:, 1:] == sims[:, :-1]
    assert bool(equal.any())  # the data does have ties
    assert bool((idx[:, 1:][equal] > idx[:, :-1][equal]).all())
    assert bool((sims[:, 1:] <= sims[:, :-1]).all())
    assert ("recomputed over all columns" in caplog.text) == (path != "dense")


@pytest.mark.parametrize("block_rows", [1, 7, 64])
def test_dense_blocks_keep_duplicates_tied(
    block_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # blocks of a few distinct rows; copies of rows in other blocks, in 40-d (inexact sums)
    x = torch.cat([_hypercube(60, seed=2), _unit(60, 8, seed=9)])
    x = torch.cat([x, _unit(120, 32, seed=4)], dim=1) / math.sqrt(2)
    copies = {50: 2, 90: 2, 7: 119, 64: 33, 65: 33}  # row -> the row it copies
    for row, src in copies.items():
        x[row] = x[src]
    monkeypatch.setattr(neighbors, "_BLOCK_BYTES", 8 * x.shape[0] * block_rows)
    sims, idx = topk_neighbors(x, 21, exclude_self=True, chunk_size=5)
    ref_s, ref_i = _reference(x, 21, True)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(sims.numpy(), ref_s, rtol=0, atol=1e-12)
    full, order = topk_neighbors(x, len(x) - 1, exclude_self=True)
    at = torch.full((len(x), len(x)), math.nan, dtype=torch.float64)  # at[i, j] = s(i, j)
    at.scatter_(1, order, full)
    for row, src in copies.items():  # a copy scores exactly as its source, in every list
        others = [i for i in range(len(x)) if i not in (row, src)]
        assert torch.equal(at[others, row], at[others, src])
        assert torch.equal(at[row, others], at[src, others])


def test_large_pools_take_the_candidate_path(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[str] = []
    for name in ("_dense_topk", "_candidate_topk"):
        real = getattr(neighbors, name)
        monkeypatch.setattr(
            neighbors, name, lambda *a, _r=real, _n=name: taken.append(_n) or _r(*a)
        )
    x = _unit(200, 6, seed=8)
    _, dense = topk_neighbors(x, 4, exclude_self=True)  # 200 <= 64 * (4 + 8)
    monkeypatch.setattr(neighbors, "_DENSE_ROWS_PER_CANDIDATE", 16)  # 200 > 16 * 12
    _, cand = topk_neighbors(x, 4, exclude_self=True)
    monkeypatch.setattr(neighbors, "_DENSE_ROWS_PER_CANDIDATE", 64)
    monkeypatch.setattr(neighbors, "_DENSE_BYTES", 8 * x.numel() - 1)  # the copy does not fit
    topk_neighbors(x, 4, exclude_self=True)
    assert taken == ["_dense_topk", "_candidate_topk", "_candidate_topk"]
    assert torch.equal(dense, cand)


def test_paths_agree_on_clustered_data() -> None:
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(30, 24, generator=g)
    labels = torch.randint(0, 30, (400,), generator=g)
    x = torch.nn.functional.normalize(
        centers[labels] + 0.3 * torch.randn(400, 24, generator=g), dim=1
    )
    a = _topk("candidates", x, 40, chunk_size=64)
    b = _topk("faiss", x, 40)
    c = _topk("dense", x, 40, chunk_size=64)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])  # the same re-scoring
    assert torch.equal(a[1], c[1])  # float64 GEMM blocks: same order, values to summation order
    torch.testing.assert_close(a[0], c[0], rtol=0, atol=1e-14)


def test_fallback_rows_still_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # no slack: every row whose k-th neighbour is not clearly above the candidate cut is recomputed
    monkeypatch.setattr(neighbors, "_SLACK", 0)
    x = _unit(80, 4, seed=5)
    sims, idx = _topk("candidates", x, 10)
    _, ref_i = _reference(x, 10, True)
    np.testing.assert_array_equal(idx.numpy(), ref_i)


def test_half_precision_input_ranks_its_float64_values() -> None:
    x = _unit(50, 8, seed=7).half()
    _, idx = topk_neighbors(x, 12, exclude_self=True)
    _, ref_i = _reference(x.double(), 12, True)
    np.testing.assert_array_equal(idx.numpy(), ref_i)


def test_similarity_rows_matches_matmul() -> None:
    x = _unit(30, 6, seed=2)
    rows = torch.tensor([4, 0, 29])
    out = similarity_rows(x, rows, exclude_self=True)
    ref = x.double()[rows] @ x.double().T
    ref[torch.arange(3), rows] = -np.inf
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k: must be an int"),
        ({"k": 10, "exclude_self": True}, r"k: must be an int in \[1, 9\]"),
        ({"k": 11}, r"\[1, 10\]"),
        ({"k": 2, "backend": "annoy"}, "backend: must be one of"),
        ({"k": 2, "chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        topk_neighbors(_unit(10, 3, seed=0), **kwargs)


def test_bad_descriptors() -> None:
    x = _unit(10, 3, seed=0)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="desc: contains NaN"):
        topk_neighbors(x, 2)
    with pytest.raises(ValueError, match="desc: expected a floating"):
        topk_neighbors(torch.ones(5, dtype=torch.long).reshape(5, 1), 2)
    with pytest.raises(ValueError, match="desc: expected a floating"):
        topk_neighbors(torch.ones(5), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_cuda_matches_cpu(backend: str) -> None:
    x = _unit(300, 32, seed=11)
    cpu = topk_neighbors(x, 20, exclude_self=True)
    gpu = topk_neighbors(x.cuda(), 20, exclude_self=True, backend=backend, chunk_size=100)
    assert gpu[0].is_cuda and gpu[1].is_cuda
    assert torch.equal(gpu[1].cpu(), cpu[1])
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=1e-12)
