"""Nearest-neighbour search of query descriptors in a database, plus alpha-QE and alpha-DBA.

Every test-time search goes through here (faiss; the miners' exact top-k is
`msvlad.mining.neighbors`). Results come in revisitop orientation: `ranks` and `scores`
are (k, n_q), one column per query, best first, ready for `msvlad.evaluation.protocol.compute_map`.

- `flat` (default) is exact inner-product search (faiss IndexFlatIP). Ties are broken by the lower
  database index, both in the order and in which items make the top k (faiss alone does neither,
  so rows with a tie across the k boundary are re-searched over the full database).
- `ivf`, `hnsw` and `ivfpq` are approximate indexes for large databases (R1M-sized). Their top k
  is whatever faiss returns, re-ordered by (-score, index); missing results are index -1.
- `shards=n` splits the database into n faiss indexes searched together (faiss.IndexShards).

alpha-QE and alpha-DBA (Radenović et al., TPAMI 2019): a descriptor is replaced by the
L2-normalised sum of itself (weight 1) and its top-k neighbours weighted by max(sim, 0)**alpha.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq"]
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw", "ivfpq")

# build/search options accepted per index kind (all optional)
_OPTIONS: dict[str, frozenset[str]] = {
    "flat": frozenset({"shards"}),
    "ivf": frozenset({"shards", "nlist", "nprobe"}),
    "hnsw": frozenset({"shards", "M", "efConstruction", "efSearch"}),
    "ivfpq": frozenset({"shards", "nlist", "nprobe", "m", "nbits"}),
}


@dataclass(eq=False)
class SearchIndex:
    """A built faiss index with what is needed to search it again (kind, options, sub-indexes)."""

    index: Any  # faiss.Index
    kind: str
    dim: int
    ntotal: int
    options: dict[str, Any] = field(default_factory=dict)
    parts: list[Any] = field(default_factory=list)  # shard sub-indexes, kept alive for faiss


def set_threads(n: int) -> int:
    """Set the faiss OpenMP thread count (process-wide, as torch.set_num_threads); return the old.

    On small shared machines OpenMP threads spin while waiting for each other, and k-means
    training (ivf, ivfpq) can run 100x slower than with a single thread.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n: expected a positive thread count, got {n!r}")
    before = int(faiss.omp_get_max_threads())
    faiss.omp_set_num_threads(int(n))
    return before


def build_index(db_desc: np.ndarray, index: IndexKind = "flat", **options: Any) -> SearchIndex:
    """Build (and train, for IVF/PQ) an inner-product index over db_desc (N, D) float32.

    Options: shards (all kinds); nlist, nprobe (ivf, ivfpq; defaults min(4 sqrt(N), N/39) and 16);
    M, efConstruction, efSearch (hnsw; defaults 32, 40, 64); m, nbits (ivfpq; defaults: the
    largest divisor of D up to D/8, and 8). IVF/PQ are trained on the database itself.
    """
    db_desc = _check_desc(db_desc, "db_desc")
    if index not in INDEX_KINDS:
        raise ValueError(f"index: expected one of {INDEX_KINDS}, got {index!r}")
    unknown = sorted(set(options) - _OPTIONS[index])
    if unknown:
        allowed = sorted(_OPTIONS[index])
        raise ValueError(
            f"index_options: {unknown} not valid for index={index!r} (allowed: {allowed})"
        )
    n, dim = db_desc.shape
    shards = int(options.get("shards") or 1)
    if not 1 <= shards <= n:
        raise ValueError(f"shards: expected 1..{n} (database size), got {shards}")
    opts = _resolve_options(index, n // shards, dim, options)
    if shards == 1:
        faiss_index = _make_index(index, dim, opts)
        _train_add(faiss_index, db_desc)
        return SearchIndex(faiss_index, index, dim, n, opts)
    sharded = faiss.IndexShards(dim, False, True)  # not threaded, successive ids
    parts = []
    for chunk in np.array_split(db_desc, shards):
        part = _make_index(index, dim, opts)
        _train_add(part, np.ascontiguousarray(chunk))
        sharded.add_shard(part)
        parts.append(part)
    return SearchIndex(sharded, index, dim, n, opts, parts)


def search_index(
    index: SearchIndex, q_desc: np.ndarray, k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Search a built index; returns (ranks (k, n_q) int64, scores (k, n_q) float32)."""
    q_desc = _check_desc(q_desc, "q_desc")
    if q_desc.shape[1] != index.dim:
        raise ValueError(
            f"q_desc: dimension {q_desc.shape[1]} does not match db_desc's {index.dim}"
        )
    k = _check_k(k, index.ntotal)
    _set_search_params(index, k)
    if index.kind == "flat":
        scores, ids = _exact_topk(index.index, q_desc, k, index.ntotal)
    else:
        scores, ids = index.index.search(q_desc, k)
        scores, ids = _sort_rows(scores, ids)
    # (n_q, k) -> revisitop orientation (k, n_q)
    ranks = np.ascontiguousarray(ids.T.astype(np.int64))
    return ranks, np.ascontiguousarray(scores.T.astype(np.float32))


def search(
    q_desc: np.ndarray,
    db_desc: np.ndarray,
    *,
    k: int | None = None,
    index: IndexKind = "flat",
    **index_options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank db_desc for each query by inner product: ranks (k, n_q) int64, scores (k, n_q) float32.

    k=None ranks the full database. index selects exact (flat) or approximate search; see
    build_index for the options.
    """
    q_desc = _check_desc(q_desc, "q_desc")
    if np.ndim(db_desc) == 2 and q_desc.shape[1] != np.shape(db_desc)[1]:
        raise ValueError(
            f"q_desc: dimension {q_desc.shape[1]} does not match db_desc's {np.shape(db_desc)[1]}"
        )
    _check_k(k, 1)  # fail on a bad k before building the index
    built = build_index(db_desc, index, **index_options)
    return search_index(built, q_desc, k)


def alpha_qe(
    q_desc: np.ndarray, db_desc: np.ndarray, ranks: np.ndarray, *, k: int = 2, alpha: float = 3.0
) -> np.ndarray:
    """alpha-QE: each query becomes L2n(q + sum of its top-k db vectors weighted by sim^alpha).

    ranks is (>= k, n_q) from `search`. If the query itself is in the database (Holidays), it is
    its own top-1 and counts as a neighbour unless the caller removes it from ranks first.
    """
    q_desc = _check_desc(q_desc, "q_desc")
    db_desc = _check_desc(db_desc, "db_desc")
    if q_desc.shape[1] != db_desc.shape[1]:
        raise ValueError(
            f"q_desc: dimension {q_desc.shape[1]} does not match db_desc's {db_desc.shape[1]}"
        )
    _check_qe_params(k, alpha)
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != q_desc.shape[0] or ranks.dtype.kind not in "iu":
        raise ValueError(
            f"ranks: expected integer (k, {q_desc.shape[0]}) ranks, got {ranks.dtype} {ranks.shape}"
        )
    if ranks.shape[0] < k:
        raise ValueError(f"ranks: has {ranks.shape[0]} rows, fewer than k={k}")
    top = ranks[:k].T  # (n_q, k)
    if np.any(top < 0) or np.any(top >= db_desc.shape[0]):
        raise ValueError(f"ranks: top-{k} indices must lie in [0, {db_desc.shape[0]})")
    return _weighted_expand(q_desc, db_desc[top], alpha)


def alpha_dba(db_desc: np.ndarray, *, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """alpha-DBA: each db vector becomes L2n(x + its top-k neighbours weighted by sim^alpha)."""
    db_desc = _check_desc(db_desc, "db_desc")
    _check_qe_params(k, alpha)
    n = db_desc.shape[0]
    if k >= n:
        raise ValueError(f"k: expected fewer neighbours than database images ({n}), got {k}")
    ranks, _ = search(db_desc, db_desc, k=k + 1)  # (k+1, N); self is normally first
    ranks = ranks.T  # (N, k+1)
    is_self = ranks == np.arange(n)[:, None]
    # drop self; with exact duplicates self may be elsewhere or absent, then drop the last column
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(ranks, dtype=bool)
    keep[np.arange(n), drop] = False
    neighbours = ranks[keep].reshape(n, k)
    return _weighted_expand(db_desc, db_desc[neighbours], alpha)


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _weighted_expand(x: np.ndarray, nbrs: np.ndarray, alpha: float) -> np.ndarray:
    """L2n(x + sum_j max(x.n_j, 0)^alpha n_j) for x (N, D), nbrs (N, k, D)."""
    sims = np.einsum("nd,nkd->nk", x.astype(np.float64), nbrs.astype(np.float64))
    weights = np.clip(sims, 0.0, None) ** alpha  # 0**0 = 1: alpha=0 is a plain mean
    out = x.astype(np.float64) + np.einsum("nk,nkd->nd", weights, nbrs.astype(np.float64))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def _check_desc(x: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, D) array, got shape {x.shape}")
    if x.dtype != np.float32:
        raise TypeError(f"{name}: expected float32 descriptors, got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return np.ascontiguousarray(x)


def _check_k(k: int | None, n: int) -> int:
    if k is None:
        return n
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k: expected a positive integer or None, got {k!r}")
    return min(int(k), n)


def _check_qe_params(k: int, alpha: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha: expected a finite value >= 0, got {alpha!r}")


def _resolve_options(kind: str, n: int, dim: int, options: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check the options against the (per-shard) database size n."""
    opts = {key: value for key, value in options.items() if key != "shards"}
    opts["shards"] = int(options.get("shards") or 1)
    if kind in ("ivf", "ivfpq"):
        # 4 sqrt(N) lists, but at least 39 training points per list (faiss's own guideline)
        nlist = int(opts.get("nlist") or max(1, min(round(4 * math.sqrt(n)), n // 39)))
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist: expected 1..{n} (images per index), got {nlist}")
        nprobe = int(opts.get("nprobe") or min(16, nlist))
        if nprobe < 1:
            raise ValueError(f"nprobe: expected a positive integer, got {nprobe}")
        opts.update(nlist=nlist, nprobe=min(nprobe, nlist))
    if kind == "ivfpq":
        m = int(opts.get("m") or _default_pq_m(dim))
        nbits = int(opts.get("nbits") or 8)
        if m < 1 or dim % m:
            raise ValueError(f"m: the descriptor dimension {dim} must be divisible by m, got {m}")
        if not 1 <= nbits <= 16:
            raise ValueError(f"nbits: expected 1..16, got {nbits}")
        if n < 2**nbits:
            raise ValueError(
                f"nbits: {nbits} bits need at least {2**nbits} training vectors, got {n}"
            )
        opts.update(m=m, nbits=nbits)
    if kind == "hnsw":
        opts.update(
            M=int(opts.get("M") or 32),
            efConstruction=int(opts.get("efConstruction") or 40),
            efSearch=int(opts.get("efSearch") or 64),
        )
        if min(opts["M"], opts["efConstruction"], opts["efSearch"]) < 1:
            raise ValueError(
                f"hnsw options: M, efConstruction, efSearch must be positive, got {opts}"
            )
    return opts


def _default_pq_m(dim: int) -> int:
    """Largest divisor of dim that is at most dim / 8 (8 dims per sub-quantizer), at least 1."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _make_index(kind: str, dim: int, opts: dict[str, Any]) -> Any:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, opts["M"], ip)
        index.hnsw.efConstruction = opts["efConstruction"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, opts["nlist"], ip)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, opts["nlist"], opts["m"], opts["nbits"], ip)
    return index  # the faiss wrapper keeps a reference to the quantizer


def _train_add(index: Any, x: np.ndarray) -> None:
    if not index.is_trained:
        index.train(x)
    index.add(x)


def _set_search_params(index: SearchIndex, k: int) -> None:
    targets = index.parts or [index.index]
    for part in targets:
        if index.kind in ("ivf", "ivfpq"):
            part.nprobe = index.options["nprobe"]
        elif index.kind == "hnsw":
            part.hnsw.efSearch = max(index.options["efSearch"], k)


def _sort_rows(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by decreasing score, ties by lower index; missing (-1) results go last."""
    # faiss rows are already score-sorted: only rows with a tie (or a gap) need the lexsort
    todo = np.flatnonzero(np.any(scores[:, 1:] >= scores[:, :-1], axis=1) | np.any(ids < 0, axis=1))
    if todo.size == 0:
        return scores, ids
    sub_s, sub_i = scores[todo], ids[todo]
    key_score = np.where(sub_i < 0, np.inf, -sub_s.astype(np.float64))
    key_id = np.where(sub_i < 0, np.iinfo(np.int64).max, sub_i)
    order = np.lexsort((key_id, key_score), axis=-1)
    scores, ids = scores.copy(), ids.copy()
    scores[todo] = np.take_along_axis(sub_s, order, axis=1)
    ids[todo] = np.take_along_axis(sub_i, order, axis=1)
    return scores, ids


def _exact_topk(index: Any, q: np.ndarray, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k with the lower-index tie rule, in order and at the k boundary."""
    k_search = min(k + 1, n)
    scores, ids = index.search(q, k_search)
    scores, ids = _sort_rows(scores, ids)
    if k_search > k:
        # a tie between the k-th and (k+1)-th score means faiss may have kept the wrong ones
        boundary = np.flatnonzero(scores[:, k - 1] == scores[:, k])
        scores, ids = scores[:, :k].copy(), ids[:, :k].copy()
        if boundary.size:
            logger.debug("flat search: %d queries tie at the k boundary", boundary.size)
            full_scores, full_ids = _sort_rows(*index.search(np.ascontiguousarray(q[boundary]), n))
            scores[boundary], ids[boundary] = full_scores[:, :k], full_ids[:, :k]
    return scores, ids
