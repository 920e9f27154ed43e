"""Exact k-nearest neighbours by cosine similarity, in row chunks, without an N x N matrix.

Descriptors are (N, D), one L2-normalised row per image, so the inner product is the cosine.
`topk_neighbors` is what the miners use to walk each anchor's ranked list (Vaccaro et al., MVA
2022, section on triplet mining): the paper's code sorts the full N x N similarity matrix; we keep
only the top k of each row, which removes the N^2 memory term.

Ranking rule, the same for every backend: rows are ordered by decreasing float64 inner product, and
equal similarities are ordered by increasing column index. Two stages make that exact:

1. candidates: the top (k + slack) columns of each row by float32 score, from `torch.topk` over a
   (chunk, N) block or from a faiss ``IndexFlatIP``;
2. re-scoring: the candidates' similarities are recomputed in float64 and the top k are selected by
   (similarity desc, index asc). A row whose k-th float64 similarity is not above the candidates'
   lowest float32 score plus the float32 error might miss a column that float32 ranked too low;
   such a row is recomputed over all N columns in float64 (rare: it needs near-ties at the
   candidate cut). The float32 error is estimated as 4x the largest error observed on the
   candidates, capped by the worst-case (Higham) bound.

On the CPU, for pools of up to 64 (k + slack) rows whose float64 copy fits 1 GiB, the torch
backend skips both stages and takes the exact top k of float64 blocks of the whole similarity
matrix (`_dense_topk`): there a float64 GEMM costs less than gathering every row's candidates. A
difficulty-mining round (`results/bench/mining_cpu_dense.json`, 2 cores, D = 5120) takes 0.22x the
candidate path's time at N = 320 (the mini pool), 0.42x at 1000, 0.76x at 2000; at 4000 (k = 36)
the candidates take over. Every path returns the same idx and float64 similarities equal up to
float64 summation order (1e-15), on the input's device.
"""

from __future__ import annotations

import logging
import math
from typing import get_args

import numpy as np
import torch
from torch import Tensor

from msvlad.config import NeighborBackend

log = logging.getLogger(__name__)

Backend = NeighborBackend  # params.yaml's miner.backend
BACKENDS: tuple[str, ...] = get_args(Backend)

_SLACK = (
    8  # extra float32 candidates per row, so near-ties at the k-th rank rarely need the fallback
)
_BLOCK_BYTES = 1 << 27  # 128 MiB: budget for one float64 row block
_CUDA_GATHER_BYTES = 1 << 28  # 256 MiB per float64 candidate gather on CUDA: few launches
_CPU_GATHER_BYTES = 1 << 24  # 16 MiB per gather on the CPU: few calls, moderate memory
_DENSE_BYTES = 1 << 30  # 1 GiB: at most this float64 copy of the pool on the CPU's dense path
_DENSE_ROWS_PER_CANDIDATE = 64  # dense while N <= 64 (k + slack): the CPU crossover is ~80


def topk_neighbors(
    desc: Tensor,
    k: int,
    *,
    chunk_size: int = 4096,
    exclude_self: bool = False,
    backend: Backend = "torch",
) -> tuple[Tensor, Tensor]:
    """Top-k cosine neighbours of each row: (sims (N, k) float64, idx (N, k) int64), ties by index.

    Args:
        desc: (N, D) floating descriptors, L2-normalised rows (inner product = cosine).
        k: neighbours per row; at most N, or N - 1 with `exclude_self`.
        chunk_size: rows scored at once; memory is O(chunk_size * N + N * k).
        exclude_self: drop row i from its own list (by index, so duplicates of i stay).
        backend: "torch" (on CUDA chunked torch.topk candidates; on the CPU float64 blocks of
            the whole matrix) or "faiss" (IndexFlatIP candidates on the CPU).

    Returns:
        sims sorted by decreasing similarity, equal values by increasing index, and their indices;
        both on `desc.device`.
    """
    _check_desc(desc)
    n = desc.shape[0]
    available = n - int(exclude_self)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= available:
        raise ValueError(f"k: must be an int in [1, {available}] for {n} rows, got {k!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive int, got {chunk_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")

    if backend == "torch" and _dense_is_cheaper(desc, k):
        return _dense_topk(desc, k, chunk_size, exclude_self)
    return _candidate_topk(desc, k, chunk_size, exclude_self, backend)


def similarity_rows(desc: Tensor, rows: Tensor, *, exclude_self: bool = False) -> Tensor:
    """Float64 similarities of `rows` against all N rows, (R, N); self entries -inf if asked."""
    _check_desc(desc)
    rows = rows.to(device=desc.device, dtype=torch.long).reshape(-1)
    n = desc.shape[0]
    out = torch.empty(rows.numel(), n, dtype=torch.float64, device=desc.device)
    q = desc[rows].double()  # (R, D)
    step = max(1, _BLOCK_BYTES // (8 * max(1, desc.shape[1])))
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[:, start:stop] = q @ desc[start:stop].double().T  # (R, block)
    if exclude_self and rows.numel():
        out[torch.arange(rows.numel(), device=desc.device), rows] = -math.inf
    return out


def rounding_bound(desc: Tensor) -> float:
    """Worst-case |float32 inner product - exact| for rows of `desc` (Higham's gamma_D bound).

    On CUDA with reduced float32 matmul precision (TF32) the unit roundoff is TF32's.
    """
    return _unit_roundoff(desc) * desc.shape[1] * 2.0 * _max_norm_sq(desc) + 1e-12


# ----------------------------------------------------------------------------- internals


def _check_desc(desc: Tensor) -> None:
    if not isinstance(desc, Tensor) or desc.ndim != 2 or not desc.is_floating_point():
        raise ValueError(
            f"desc: expected a floating (N, D) tensor, got "
            f"{getattr(desc, 'dtype', type(desc).__name__)} "
            f"of shape {tuple(getattr(desc, 'shape', ()))}"
        )
    if desc.shape[0] < 1 or desc.shape[1] < 1:
        raise ValueError(f"desc: needs at least one row and one column, got {tuple(desc.shape)}")
    if not bool(torch.isfinite(desc.amax(1)).all() and torch.isfinite(desc.amin(1)).all()):
        raise ValueError("desc: contains NaN or inf")


def _unit_roundoff(desc: Tensor) -> float:
    if desc.is_cuda and torch.get_float32_matmul_precision() != "highest":
        return 2.0**-11  # TF32 / bf16x3 products
    return 2.0**-24


def _max_norm_sq(desc: Tensor) -> float:
    return float(torch.linalg.vector_norm(desc.float(), dim=1).max()) ** 2


def _dense_is_cheaper(desc: Tensor, k: int) -> bool:
    """Whether the dense float64 path beats candidates + re-scoring (the CPU, small pools)."""
    n = desc.shape[0]
    fits = 8 * desc.numel() <= _DENSE_BYTES
    return not desc.is_cuda and fits and n <= _DENSE_ROWS_PER_CANDIDATE * (k + _SLACK)


def _candidate_topk(
    desc: Tensor, k: int, chunk_size: int, exclude_self: bool, backend: Backend
) -> tuple[Tensor, Tensor]:
    """Float32 candidates (torch or faiss), then float64 re-scoring with the full-row fallback."""
    available = desc.shape[0] - int(exclude_self)
    n_cand = min(available, k + _SLACK)
    if backend == "torch":
        cand, scores = _torch_candidates(desc, n_cand, chunk_size, exclude_self)
    else:
        cand, scores = _faiss_candidates(desc, n_cand, exclude_self)
    complete = n_cand == available  # every eligible column is a candidate: nothing can be missed
    return _rescore(desc, k, cand, scores, complete, chunk_size, exclude_self)


def _torch_candidates(
    desc: Tensor, n_cand: int, chunk_size: int, exclude_self: bool
) -> tuple[Tensor, Tensor]:
    """Top n_cand columns per row by float32 score: (indices, their float32 scores), (N, n_cand)."""
    n = desc.shape[0]
    x = desc.float()
    cand = torch.empty(n, n_cand, dtype=torch.long, device=desc.device)
    cand_scores = torch.empty(n, n_cand, dtype=torch.float32, device=desc.device)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        scores = x[start:stop] @ x.T  # (chunk, N)
        if exclude_self:
            rows = torch.arange(stop - start, device=desc.device)
            scores[rows, rows + start] = -math.inf
        vals, idx = scores.topk(n_cand, dim=1, sorted=False)  # (chunk, n_cand)
        cand[start:stop] = idx
        cand_scores[start:stop] = vals
        del scores
    return cand, cand_scores


def _faiss_candidates(desc: Tensor, n_cand: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """Same contract as `_torch_candidates`, from a faiss IndexFlatIP search on the CPU."""
    import faiss  # local import: faiss is only needed for this backend

    n, d = desc.shape
    x = np.ascontiguousarray(desc.detach().float().cpu().numpy())
    index = faiss.IndexFlatIP(d)
    index.add(x)
    n_search = min(n, n_cand + int(exclude_self))
    scores, idx = index.search(x, n_search)  # (N, n_search), decreasing
    scores_t = torch.from_numpy(scores)
    idx_t = torch.from_numpy(idx).long()
    if bool((idx_t < 0).any()):
        raise RuntimeError("faiss returned fewer neighbours than requested")
    if exclude_self:
        is_self = idx_t == torch.arange(n)[:, None]
        # self not returned (ties at the cut): drop the last column instead; it is the lowest
        # score, so every column left out still scores <= the lowest candidate
        is_self[~is_self.any(1), -1] = True
        idx_t = idx_t[~is_self].view(n, n_search - 1)  # n_search - 1 == n_cand
        scores_t = scores_t[~is_self].view(n, n_search - 1)
    return idx_t.to(desc.device), scores_t.to(desc.device)


def _rescore(
    desc: Tensor,
    k: int,
    cand: Tensor,
    scores: Tensor,
    complete: bool,
    chunk_size: int,
    exclude_self: bool,
) -> tuple[Tensor, Tensor]:
    """Float64 re-scoring of the candidates, exact top-k, and full-row fallback where unsafe.

    A column left out of row i's candidates scored at most bound_i = min(scores[i]) in float32,
    so its exact similarity is at most bound_i + eps, eps the float32 error. Row i is safe when
    its k-th float64 similarity exceeds that. eps is 4x the largest float32 error observed on the
    N x n_cand candidates (floored at a few units of roundoff), capped by the worst-case bound.
    """
    n, n_cand = cand.shape
    d = desc.shape[1]
    cand, order = cand.sort(dim=1)  # ascending index: ties resolve to the lower index
    scores = scores.gather(1, order)
    vals = torch.empty(n, n_cand, dtype=torch.float64, device=desc.device)
    budget = _CUDA_GATHER_BYTES if desc.is_cuda else _CPU_GATHER_BYTES
    step = max(1, min(chunk_size, budget // (8 * n_cand * d)))
    # one float64 copy of the descriptors when it fits the gather budget (the conversion is exact,
    # so gathering from it equals converting each gathered chunk, at one conversion instead of many)
    desc64 = desc.double() if 8 * desc.numel() <= budget else None
    for start in range(0, n, step):
        stop = min(n, start + step)
        if desc64 is not None:
            q, c_desc = desc64[start:stop], desc64[cand[start:stop]]  # (c, D), (c, n_cand, D)
        else:
            q, c_desc = desc[start:stop].double(), desc[cand[start:stop]].double()
        vals[start:stop] = torch.bmm(c_desc, q.unsqueeze(2)).squeeze(2)  # (c, n_cand)
    sims, idx = _exact_topk(vals, cand, k)  # (N, k) each
    if complete:
        return sims, idx
    norm_sq = _max_norm_sq(desc)
    floor = 8.0 * _unit_roundoff(desc) * norm_sq
    err = float((vals - scores.double()).abs().max())  # largest float32 error seen
    eps = min(rounding_bound(desc), max(4.0 * err, floor)) + 1e-12
    bound = scores.amin(1).double()  # (N,)
    unsafe = torch.nonzero(sims[:, k - 1] <= bound + eps).flatten()
    if unsafe.numel():
        log.debug("topk_neighbors: %d of %d rows recomputed over all columns", unsafe.numel(), n)
        cols = torch.arange(n, device=desc.device)
        row_step = max(1, _BLOCK_BYTES // (8 * n))
        for start in range(0, unsafe.numel(), row_step):
            rows = unsafe[start : start + row_step]
            full = similarity_rows(desc, rows, exclude_self=exclude_self)  # (r, N)
            sims[rows], idx[rows] = _exact_topk(full, cols.expand(rows.numel(), n), k)
    return sims, idx


def _dense_topk(desc: Tensor, k: int, chunk_size: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """Exact top k from float64 products of the distinct rows, each pair computed once.

    A float64 GEMM may round the same product differently at another position of the matrix, which
    would split the tie of duplicated rows (one photo filed in two classes). So the products are
    taken between distinct rows only (`torch.unique`), each distinct row in exactly one block, and
    copied to the duplicates: equal rows always get equal similarities, ranked by index.
    Memory: a float64 copy of the distinct rows and one (rows, N) float64 block.
    """
    n = desc.shape[0]
    exact = desc if desc.dtype in (torch.float32, torch.float64) else desc.float()
    uniq, inv = torch.unique(exact, dim=0, return_inverse=True)
    uniq64, u = uniq.double(), uniq.shape[0]
    order = torch.argsort(inv, stable=True)  # rows grouped by their distinct row
    step = max(1, min(chunk_size, _BLOCK_BYTES // (8 * n)))
    edges = [*range(0, u, step), u]
    cuts = torch.searchsorted(inv[order], torch.tensor(edges)).tolist()
    cols = torch.arange(n)
    sims = torch.empty(n, k, dtype=torch.float64)
    idx = torch.empty(n, k, dtype=torch.long)
    for u0, u1, a, b in zip(edges[:-1], edges[1:], cuts[:-1], cuts[1:], strict=True):
        rows = order[a:b]
        prod = uniq64[u0:u1] @ uniq64.T  # (distinct rows of the block, U)
        vals = prod[inv[rows] - u0][:, inv]  # (rows, N)
        if exclude_self:
            vals[torch.arange(len(rows)), rows] = -math.inf
        sims[rows], idx[rows] = _exact_topk(vals, cols.expand(len(rows), n), k)
    return sims, idx


def _exact_topk(vals: Tensor, cols: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top k of each row by (value desc, col asc); `cols` must be ascending along each row."""
    r = vals.shape[0]
    kth = vals.topk(k, dim=1).values[:, -1:]  # (r, 1): the k-th largest value
    above = vals > kth
    tied = vals == kth
    need = k - above.sum(1, keepdim=True)  # how many tied values make the cut
    take = above | (tied & (tied.cumsum(1) <= need))  # exactly k per row, lowest tied cols first
    sel_vals = vals[take].view(r, k)  # row-major: ascending col within each row
    sel_cols = cols[take].view(r, k)
    order = torch.sort(sel_vals, dim=1, descending=True, stable=True).indices
    return sel_vals.gather(1, order), sel_cols.gather(1, order)
