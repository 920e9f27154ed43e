"""Nearest-neighbour search of query descriptors in a database, plus alpha-QE and alpha-DBA.

Every test-time search goes through here (faiss; the miners' exact top-k is
`msvlad.mining.neighbors`). Results come in revisitop orientation: `ranks` and `scores`
are (k, n_q), one column per query, best first, ready for `msvlad.evaluation.protocol.compute_map`.

- `flat` (default) is exact inner-product search (faiss IndexFlatIP). Ties are broken by the lower
  database index, both in the order and in which items make the top k (faiss alone does neither,
  so rows with a tie across the k boundary are re-searched over the full database).
- Approximate indexes for large databases (R1M-sized): `ivf` (inverted lists of float32 vectors),
  `ivfsq8` (inverted lists of 8-bit scalar-quantised vectors, a quarter of the bytes), `hnsw`
  (graph over float32 vectors), `ivfpq` (product-quantised codes), `ivfpq_rerank` (IVF-PQ codes
  whose shortlist of `rerank` x k candidates is re-scored exactly against the database) and `opq`
  (IVF-PQ codes of OPQ-rotated vectors, re-ranked like ivfpq_rerank). Their top k is whatever
  faiss returns, re-ordered by (-score, index); missing results are index -1. Quantisers are
  trained on a seeded sample of `train_size` vectors, so the build time stays bounded at R1M
  scale.
- `rerank=r` (ivfsq8, ivfpq, opq, ivfpq_rerank) re-scores the top r*k candidates with exact inner
  products read from the database array given to `build_index`. The index keeps a reference to
  that array, not a copy: at R1M scale it may be a `np.memmap` of a .npy file, so the index itself
  holds only the codes.
- `shards=n` splits the database into n faiss indexes searched together (faiss.IndexShards).

alpha-QE and alpha-DBA (Radenović et al., TPAMI 2019): a descriptor is replaced by the
L2-normalised sum of itself (weight 1) and its top-k neighbours weighted by max(sim, 0)**alpha.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import faiss
import numpy as np

from msvlad.config import ConfigError, EvaluateConfig, IndexName, check_value

logger = logging.getLogger(__name__)

IndexKind = IndexName  # the names params.yaml's evaluate.index accepts
INDEX_KINDS: tuple[str, ...] = get_args(IndexName)

_IVF = frozenset({"nlist", "nprobe", "train_size"})
_PQ = _IVF | {"m", "nbits", "rerank"}
# build/search options accepted per index kind (all optional)
_OPTIONS: dict[str, frozenset[str]] = {
    "flat": frozenset({"shards"}),
    "ivf": _IVF | {"shards"},
    "ivfsq8": _IVF | {"shards", "rerank"},
    "hnsw": frozenset({"shards", "M", "efConstruction", "efSearch"}),
    "ivfpq": _PQ | {"shards"},
    "opq": _PQ | {"shards"},
    "ivfpq_rerank": _PQ | {"shards"},
}
# database rows handled at once when checking, adding and sampling (bounded temporary memory)
_CHUNK = 65536


@dataclass(eq=False)
class SearchIndex:
    """A built faiss index with what is needed to search it again (kind, options, sub-indexes)."""

    index: Any  # faiss.Index
    kind: str
    dim: int
    ntotal: int
    options: dict[str, Any] = field(default_factory=dict)
    parts: list[Any] = field(default_factory=list)  # shard sub-indexes, kept alive for faiss
    database: np.ndarray | None = None  # the caller's (N, D) array, read when re-ranking

    @property
    def code_bytes(self) -> int:
        """Bytes of the faiss index itself (serialised size), without the re-ranking database."""
        return int(sum(faiss.serialize_index(p).size for p in (self.parts or [self.index])))


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

    Options: shards (all kinds); nlist, nprobe, train_size (IVF kinds; defaults min(2 sqrt(N),
    N/40), 16 and min(N, 40 nlist), for PQ kinds at least 64 * 2**nbits); M, efConstruction,
    efSearch (hnsw; defaults 32, 40, 64); m, nbits (PQ kinds; defaults: the largest divisor of D
    up to D/8, and 8); rerank (ivfsq8 and the PQ kinds; default 0, 10 for ivfpq_rerank and opq).
    Quantisers train on a seeded sample of train_size database vectors. db_desc may be a
    np.memmap; it is added in chunks, and kept by reference (not copied) for re-ranking.
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
    # kept by reference where re-ranking is possible (with_search_options may turn it on)
    database = db_desc if "rerank" in opts else None
    if shards == 1:
        faiss_index = _make_index(index, dim, opts)
        _train_add(faiss_index, db_desc, opts)
        return SearchIndex(faiss_index, index, dim, n, opts, database=database)
    sharded = faiss.IndexShards(dim, False, True)  # not threaded, successive ids
    parts = []
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = _make_index(index, dim, opts)
        _train_add(part, db_desc[lo:hi], opts)
        sharded.add_shard(part)
        parts.append(part)
    return SearchIndex(sharded, index, dim, n, opts, parts, database)


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
    elif index.options.get("rerank") and index.database is not None:
        shortlist = min(index.ntotal, index.options["rerank"] * k)
        _, ids = index.index.search(q_desc, shortlist)
        scores, ids = _rescore(q_desc, index.database, ids, k)
    else:
        scores, ids = index.index.search(q_desc, k)
        scores, ids = _sort_rows(scores, ids)
    # (n_q, k) -> revisitop orientation (k, n_q)
    ranks = np.ascontiguousarray(ids.T.astype(np.int64))
    return ranks, np.ascontiguousarray(scores.T.astype(np.float32))


def with_search_options(index: SearchIndex, **options: Any) -> SearchIndex:
    """The same built index, searched with other search-time options (nprobe for the IVF kinds,
    efSearch for hnsw, rerank where the kind allows it); nothing is rebuilt or copied."""
    allowed = _SEARCH_OPTIONS & _OPTIONS[index.kind]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"search options: {unknown} not valid for index={index.kind!r} (allowed: "
            f"{sorted(allowed)})"
        )
    bad = {key: value for key, value in options.items() if int(value) < (key != "rerank")}
    if bad:
        raise ValueError(f"search options: expected positive values (rerank >= 0), got {bad}")
    opts = {**index.options, **{key: int(value) for key, value in options.items()}}
    if "nprobe" in opts:
        opts["nprobe"] = min(opts["nprobe"], opts["nlist"])
    return dataclasses.replace(index, options=opts)


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
    k, alpha = _check_qe_params("qe", k, alpha, db_desc.shape[0])
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
    n = db_desc.shape[0]
    k, alpha = _check_qe_params("dba", k, alpha, n)
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
    # in row chunks: a whole-array isfinite of an R1M database would allocate 2 GB
    if not all(np.isfinite(x[i : i + _CHUNK]).all() for i in range(0, x.shape[0], _CHUNK)):
        raise ValueError(f"{name}: contains NaN or inf")
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _check_k(k: int | None, n: int) -> int:
    if k is None:
        return n
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k: expected a positive integer or None, got {k!r}")
    return min(int(k), n)


def check_neighbours(kind: Literal["qe", "dba"], k: int, n_db: int, where: str = "") -> int:
    """`k` of alpha-QE or alpha-DBA checked as params.yaml's `evaluate.<kind>_k` and against the
    database: QE takes at most every database image, DBA every other one (no clamp: a k past
    the database is a mistake). The evaluate stage calls this per test set before extracting."""
    key = f"evaluate.{kind}_k"
    k = check_value(key, k)
    most = n_db if kind == "qe" else n_db - 1
    if k > most:
        of = f" of {where}" if where else ""
        raise ConfigError(
            f"{key}: {k} neighbours, but the {n_db} database images{of} give at most {most}"
        )
    return k


def check_expansions(cfg: EvaluateConfig, variants: Sequence[str], n_db: int, where: str) -> None:
    """`check_neighbours` of evaluate.qe_k and dba_k, for the variants asked for."""
    for kind in ("qe", "dba"):
        if kind in variants:
            check_neighbours(kind, getattr(cfg, f"{kind}_k"), n_db, where)


def _check_qe_params(
    kind: Literal["qe", "dba"], k: int, alpha: float, n_db: int
) -> tuple[int, float]:
    return check_neighbours(kind, k, n_db), check_value(f"evaluate.{kind}_alpha", alpha)


def _resolve_options(kind: str, n: int, dim: int, options: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check the options against the (per-shard) database size n."""
    opts = {key: value for key, value in options.items() if key != "shards"}
    opts["shards"] = int(options.get("shards") or 1)
    if kind in _IVF_KINDS:
        # 2 sqrt(N) lists (faiss suggests 4-16 sqrt(N) for speed; fewer lists keep the k-means
        # and the assignment of an R1M database within minutes on a few cores), and at least 40
        # training points per list (faiss's own guideline is 39)
        nlist = int(opts.get("nlist") or max(1, min(round(2 * math.sqrt(n)), n // 40)))
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist: expected 1..{n} (images per index), got {nlist}")
        nprobe = int(opts.get("nprobe") or min(16, nlist))
        if nprobe < 1:
            raise ValueError(f"nprobe: expected a positive integer, got {nprobe}")
        # the PQ kinds also train 2**nbits centroids per sub-space on the same sample
        codebook = _PQ_POINTS_PER_CENTROID * 2 ** int(opts.get("nbits") or 8)
        train_size = int(
            opts.get("train_size") or min(n, max(40 * nlist, codebook if kind in _PQ_KINDS else 0))
        )
        if train_size < nlist:
            raise ValueError(f"train_size: expected >= nlist={nlist} vectors, got {train_size}")
        opts.update(nlist=nlist, nprobe=min(nprobe, nlist), train_size=min(train_size, n))
    if kind in _PQ_KINDS:
        m = int(opts.get("m") or _default_pq_m(dim))
        nbits = int(opts.get("nbits") or 8)
        if m < 1 or dim % m:
            raise ValueError(f"m: the descriptor dimension {dim} must be divisible by m, got {m}")
        if not 1 <= nbits <= 16:
            raise ValueError(f"nbits: expected 1..16, got {nbits}")
        if opts["train_size"] < 2**nbits:
            raise ValueError(
                f"nbits: {nbits} bits need at least {2**nbits} training vectors, "
                f"got {opts['train_size']}"
            )
        if kind == "opq" and opts["train_size"] < 256:
            raise ValueError(
                f"train_size: the OPQ rotation trains 256 centroids per sub-space and needs at "
                f"least 256 vectors, got {opts['train_size']}"
            )
        opts.update(m=m, nbits=nbits)
    if "rerank" in _OPTIONS[kind]:
        rerank = opts.get("rerank")
        rerank = int(_DEFAULT_RERANK.get(kind, 0) if rerank is None else rerank)
        if rerank < 0:
            raise ValueError(f"rerank: expected a shortlist factor >= 0 (0: off), got {rerank}")
        opts["rerank"] = rerank
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


_SEARCH_OPTIONS = frozenset({"nprobe", "efSearch", "rerank"})
_PQ_POINTS_PER_CENTROID = 64  # training vectors per PQ centroid (faiss: 39 minimum, 256 default)
_OPQ_ROUNDS = 3  # OPQ rotation rounds (faiss: 50); each is a D x D SVD, ~1 min at D = 2048
_IVF_KINDS = frozenset({"ivf", "ivfsq8", "ivfpq", "opq", "ivfpq_rerank"})
_PQ_KINDS = frozenset({"ivfpq", "opq", "ivfpq_rerank"})
# shortlist factor of the kinds that re-rank by default (the others: 0, no re-ranking)
_DEFAULT_RERANK: dict[str, int] = {"ivfpq_rerank": 10, "opq": 10}


def _default_pq_m(dim: int) -> int:
    """Largest divisor of dim that is at most dim / 8 (8 dims per sub-quantizer), at least 1."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _factory_string(kind: str, opts: dict[str, Any]) -> str:
    """The faiss index_factory description of an index kind with resolved options."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{opts['M']},Flat"
    ivf = f"IVF{opts['nlist']}"
    if kind == "ivf":
        return f"{ivf},Flat"
    if kind == "ivfsq8":
        return f"{ivf},SQ8"
    pq = f"PQ{opts['m']}x{opts['nbits']}np"  # np: no polysemous code permutation (minutes)
    return f"OPQ{opts['m']},{ivf},{pq}" if kind == "opq" else f"{ivf},{pq}"


def _make_index(kind: str, dim: int, opts: dict[str, Any]) -> Any:
    index = faiss.index_factory(dim, _factory_string(kind, opts), faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = opts["efConstruction"]
    if kind in _PQ_KINDS:
        # PQ codebooks: 2**nbits centroids in each of m small sub-spaces, trained one after the
        # other; faiss's default sample (256 points per centroid) makes that the slowest step of
        # the build, while 64 per centroid give the same codebooks within noise
        pq = faiss.downcast_index(faiss.extract_index_ivf(index)).pq
        pq.cp.max_points_per_centroid = _PQ_POINTS_PER_CENTROID
    if kind == "opq":
        # the rotation alternates PQ training and a D x D Procrustes step (an SVD): fewer,
        # smaller rounds than faiss's defaults (50 rounds on 65536 vectors) keep it within
        # minutes at D = 2048
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        opq.niter = _OPQ_ROUNDS
        opq.max_train_points = _PQ_POINTS_PER_CENTROID * 2 ** opts["nbits"]
    return index


def _train_add(index: Any, x: np.ndarray, opts: dict[str, Any]) -> None:
    """Train on a seeded sample of train_size rows (sorted, so a memmap reads forward), then add
    the rows in chunks."""
    n = x.shape[0]
    if not index.is_trained:
        size = min(n, int(opts.get("train_size") or n))
        if size < n:
            rows = np.sort(np.random.default_rng(0).choice(n, size, replace=False))
            sample = np.concatenate([x[rows[i : i + _CHUNK]] for i in range(0, size, _CHUNK)])
        else:
            sample = np.ascontiguousarray(x)
        index.train(sample)
        del sample
    for start in range(0, n, _CHUNK):
        index.add(np.ascontiguousarray(x[start : start + _CHUNK]))


def _set_search_params(index: SearchIndex, k: int) -> None:
    for part in index.parts or [index.index]:
        if index.kind in _IVF_KINDS:
            faiss.extract_index_ivf(part).nprobe = index.options["nprobe"]
        elif index.kind == "hnsw":
            part.hnsw.efSearch = max(index.options["efSearch"], k)


def _rescore(
    q: np.ndarray, database: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its shortlisted database rows (read in place by
    faiss, no gathered copy), top k by (-score, index); missing (-1) candidates go last.
    ids is (n_q, shortlist)."""
    n_q, width = ids.shape
    cand = np.ascontiguousarray(np.sort(ids, axis=1), dtype=np.int64)  # forward reads of a memmap
    scores = np.empty((n_q, width), dtype=np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(scores),
        faiss.swig_ptr(q),
        faiss.swig_ptr(database),
        faiss.swig_ptr(cand),
        database.shape[1],
        n_q,
        width,
    )  # -inf where the id is -1
    key_id = np.where(cand >= 0, cand, np.iinfo(np.int64).max)
    order = np.lexsort((key_id, -scores.astype(np.float64)), axis=-1)[:, :k]
    out_s = np.full((n_q, k), -np.inf, dtype=np.float32)
    out_i = np.full((n_q, k), -1, dtype=np.int64)
    out_s[:, : order.shape[1]] = np.take_along_axis(scores, order, axis=1)
    out_i[:, : order.shape[1]] = np.take_along_axis(cand, order, axis=1)
    return out_s, out_i


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
