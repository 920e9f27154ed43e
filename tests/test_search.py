"""Search against numpy brute force (with the lower-index tie rule), ANN recall, alpha-QE/DBA."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from msvlad.evaluation.search import (
    INDEX_KINDS,
    alpha_dba,
    alpha_qe,
    build_index,
    search,
    search_index,
    set_threads,
    with_search_options,
)


@pytest.fixture(autouse=True)
def one_faiss_thread() -> Iterator[None]:
    """k-means under OpenMP stalls for seconds on a loaded 2-core machine; one thread is steady."""
    before = set_threads(1)
    yield
    set_threads(before)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Oracle: stable argsort of -scores (ties -> lower index), top k, (k, n_q)."""
    scores = q.astype(np.float64) @ db.astype(np.float64).T  # (n_q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order.T, np.take_along_axis(scores, order, axis=1).T


@pytest.fixture
def clustered_labelled() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """20 tight clusters in 32-D: (q, db, q_label, db_label)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    db_label, q_label = rng.integers(0, 20, 1200), rng.integers(0, 20, 40)
    db = unit(centres[db_label] + 0.3 * rng.normal(size=(1200, 32)))
    q = unit(centres[q_label] + 0.3 * rng.normal(size=(40, 32)))
    return q, db, q_label, db_label


@pytest.fixture
def clustered(clustered_labelled) -> tuple[np.ndarray, np.ndarray]:
    return clustered_labelled[:2]


def test_flat_equals_numpy_argsort(clustered) -> None:
    q, db = clustered
    ranks, scores = search(q, db)
    want_r, want_s = brute_force(q, db, db.shape[0])
    assert ranks.shape == (1200, 40) and ranks.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ranks, want_r)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    top, top_s = search(q, db, k=7)
    np.testing.assert_array_equal(top, want_r[:7])
    np.testing.assert_array_equal(top_s, scores[:7])


@pytest.mark.parametrize("n_q", [1, 3, 30])  # faiss uses a SIMD path below 20 queries, BLAS above
def test_flat_ties_break_by_lower_index(n_q: int) -> None:
    # small-integer vectors: inner products are exact in float32 and tie very often
    rng = np.random.default_rng(n_q)
    for _ in range(15):
        n, d = int(rng.integers(5, 300)), int(rng.integers(2, 5))
        db = rng.integers(-1, 2, size=(n, d)).astype(np.float32)
        q = rng.integers(-1, 2, size=(n_q, d)).astype(np.float32)
        k = int(rng.integers(1, n + 1))
        ranks, scores = search(q, db, k=k)
        want_r, want_s = brute_force(q, db, k)
        np.testing.assert_array_equal(ranks, want_r)
        np.testing.assert_array_equal(scores, want_s.astype(np.float32))


def test_duplicates_in_database_keep_lower_index_first() -> None:
    db = np.tile(np.eye(4, dtype=np.float32)[:1], (6, 1))  # six identical vectors
    ranks, _ = search(db[:1], db, k=3)
    np.testing.assert_array_equal(ranks[:, 0], [0, 1, 2])


def test_k_larger_than_database_is_clamped(clustered) -> None:
    q, db = clustered
    ranks, _ = search(q, db[:5], k=50)
    assert ranks.shape == (5, 40)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("ivf", {"nlist": 16, "nprobe": 4}),
        ("hnsw", {"M": 16}),
        ("ivf", {"nlist": 8, "nprobe": 4, "shards": 3}),
    ],
)
def test_approximate_recall_on_clustered_data(clustered, kind, options) -> None:
    q, db = clustered
    exact, _ = search(q, db, k=10)
    ranks, scores = search(q, db, k=10, index=kind, **options)
    assert ranks.shape == (10, 40)
    recall = np.mean([len(set(ranks[:, i]) & set(exact[:, i])) / 10 for i in range(40)])
    assert recall >= 0.95
    assert np.all(np.diff(scores, axis=0) <= 1e-6)  # best first


# every approximate kind configured to look everywhere: all lists probed, a beam as wide as the
# database, a re-ranking shortlist as long as the database (1200 vectors, k = 10)
EXHAUSTIVE: dict[str, dict] = {
    "ivf": {"nlist": 8, "nprobe": 8},
    "ivfsq8": {"nlist": 8, "nprobe": 8, "rerank": 120},
    "hnsw": {"M": 8, "efSearch": 1200},
    "ivfpq": {"nlist": 8, "nprobe": 8, "m": 16, "nbits": 4, "rerank": 120},
    "opq": {"nlist": 8, "nprobe": 8, "m": 16, "nbits": 4, "rerank": 120},
    "ivfpq_rerank": {"nlist": 8, "nprobe": 8, "m": 16, "nbits": 4, "rerank": 120},
}


def test_exhaustive_configurations_cover_every_approximate_kind() -> None:
    assert set(EXHAUSTIVE) == set(INDEX_KINDS) - {"flat"}


@pytest.mark.parametrize("kind", sorted(EXHAUSTIVE))
def test_each_kind_returns_the_exact_top_k_when_exhaustive(clustered, kind) -> None:
    q, db = clustered
    want_r, want_s = brute_force(q, db, 10)
    ranks, scores = search(q, db, k=10, index=kind, **EXHAUSTIVE[kind])
    np.testing.assert_array_equal(ranks, want_r)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivfsq8", "ivfpq", "opq"])
def test_rerank_fixes_the_order_that_codes_blur(clustered, kind) -> None:
    # the codes alone order the candidates approximately; exact re-scoring of a shortlist that
    # holds the true top 10 must give the exact ranking (and exact scores)
    q, db = clustered
    codes = {} if kind == "ivfsq8" else {"m": 16, "nbits": 4}
    index = build_index(db, kind, nlist=8, nprobe=8, train_size=600, rerank=0, **codes)
    assert index.options["train_size"] == 600 and index.options["rerank"] == 0
    coarse, coarse_scores = search_index(index, q, k=10)
    ranks, scores = search_index(with_search_options(index, rerank=120), q, k=10)
    want_r, want_s = brute_force(q, db, 10)
    np.testing.assert_array_equal(ranks, want_r)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    assert np.abs(coarse_scores - want_s).max() > 1e-5  # the codes' scores were approximate


def test_rerank_reads_a_memmap_database_without_copying(clustered, tmp_path) -> None:
    q, db = clustered
    stored = np.lib.format.open_memmap(tmp_path / "db.npy", "w+", np.float32, db.shape)
    stored[:] = db
    index = build_index(stored, "ivfpq_rerank", nlist=8, nprobe=8, m=16, nbits=4, rerank=120)
    assert index.database is stored  # a reference: the index holds only its codes
    assert index.code_bytes < db.nbytes / 4
    np.testing.assert_array_equal(search_index(index, q, k=10)[0], brute_force(q, db, 10)[0])


def test_rerank_with_a_short_candidate_list_scores_what_it_found(clustered) -> None:
    # one list probed: faiss pads the shortlist with -1, which must not reach the top k
    q, db = clustered
    index = build_index(db, "ivfpq_rerank", nlist=8, nprobe=1, m=16, nbits=4, rerank=120)
    ranks, scores = search_index(index, q, k=10)
    assert ranks.min() >= 0 and np.all(np.diff(scores, axis=0) <= 0)
    exact = np.einsum("kqd,qd->kq", db[ranks].astype(np.float64), q.astype(np.float64))
    np.testing.assert_allclose(scores, exact, atol=1e-5)


def test_with_search_options_reuses_the_index(clustered) -> None:
    q, db = clustered
    index = build_index(db, "ivf", nlist=16, nprobe=1)
    wide = with_search_options(index, nprobe=99)
    assert wide.index is index.index and wide.options["nprobe"] == 16  # clamped to nlist
    assert index.options["nprobe"] == 1  # the original handle is unchanged
    np.testing.assert_array_equal(search_index(wide, q, k=10)[0], brute_force(q, db, 10)[0])
    with pytest.raises(ValueError, match="search options"):
        with_search_options(index, efSearch=10)
    with pytest.raises(ValueError, match="search options"):
        with_search_options(index, rerank=2)  # ivf stores float32 vectors: nothing to re-rank
    with pytest.raises(ValueError, match="search options"):
        with_search_options(index, nprobe=0)


def test_code_bytes_follow_the_encoding(clustered) -> None:
    _, db = clustered
    flat = build_index(db, "flat").code_bytes
    assert flat >= db.nbytes
    sq8 = build_index(db, "ivfsq8", nlist=4).code_bytes
    assert db.nbytes / 4 <= sq8 < db.nbytes / 4 + 12 * len(db) + 4 * 4 * 32 + 4096
    pq = build_index(db, "ivfpq", nlist=4, m=8, nbits=4).code_bytes
    assert pq < sq8


def test_ivfpq_retrieves_the_query_cluster(clustered_labelled) -> None:
    # PQ codes are too coarse to order points inside one tight cluster, but not to find the cluster
    q, db, q_label, db_label = clustered_labelled
    ranks, scores = search(q, db, k=10, index="ivfpq", nlist=4, nprobe=4, m=16, nbits=4)
    assert ranks.shape == (10, 40) and ranks.min() >= 0 and ranks.max() < 1200
    assert np.mean(db_label[ranks] == q_label[None, :]) >= 0.95
    assert np.all(np.diff(scores, axis=0) <= 1e-6)


def test_sharded_flat_equals_single_index(clustered) -> None:
    q, db = clustered
    np.testing.assert_array_equal(search(q, db, k=20, shards=4)[0], search(q, db, k=20)[0])


def test_built_index_is_reusable(clustered) -> None:
    q, db = clustered
    index = build_index(db, "ivf", nlist=10, nprobe=10)
    r1, _ = search_index(index, q[:10], k=5)
    r2, _ = search_index(index, q[10:20], k=5)
    want, _ = search(q[:20], db, k=5)  # nprobe = nlist: exhaustive
    np.testing.assert_array_equal(np.concatenate([r1, r2], axis=1), want)


def test_alpha_qe_alpha0_k1_is_mean_of_query_and_top1(clustered) -> None:
    q, db = clustered
    ranks, _ = search(q, db, k=3)
    out = alpha_qe(q, db, ranks, k=1, alpha=0.0)
    np.testing.assert_allclose(out, unit(q + db[ranks[0]]), atol=1e-6)
    assert out.dtype == np.float32


def test_alpha_qe_weights_by_similarity_power() -> None:
    q = unit(np.array([[1.0, 0.0, 0.0]]))
    db = unit(np.array([[0.8, 0.6, 0.0], [0.6, 0.0, 0.8], [0.0, 1.0, 0.0]]))
    ranks = np.array([[0], [1], [2]])
    # sims 0.8, 0.6 -> weights 0.512, 0.216: q + 0.512 db0 + 0.216 db1
    want = q[0] + 0.512 * db[0] + 0.216 * db[1]
    np.testing.assert_allclose(
        alpha_qe(q, db, ranks, k=2, alpha=3.0)[0], want / np.linalg.norm(want), atol=1e-6
    )
    # a negative similarity contributes nothing (weight clipped to 0)
    out = alpha_qe(-db[2:3], db, np.array([[0]]), k=1, alpha=3.0)
    np.testing.assert_allclose(out, -db[2:3], atol=1e-6)


def test_alpha_dba_shape_norms_and_k1_alpha0(clustered) -> None:
    _, db = clustered
    out = alpha_dba(db, k=2, alpha=3.0)
    assert out.shape == db.shape and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # k=1, alpha=0: the mean of each vector and its nearest other vector
    nn = brute_force(db, db, 2)[0][1]
    np.testing.assert_allclose(alpha_dba(db, k=1, alpha=0.0), unit(db + db[nn]), atol=1e-6)


def test_alpha_dba_with_exact_duplicates_drops_self() -> None:
    db = unit(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    out = alpha_dba(db, k=1, alpha=1.0)
    np.testing.assert_allclose(out[:2], db[:2], atol=1e-6)  # neighbour is the twin
    np.testing.assert_allclose(out[2], db[2], atol=1e-6)  # neighbour at sim 0 has weight 0


def test_set_threads_returns_previous_value() -> None:
    assert set_threads(2) == 1  # the autouse fixture set 1
    assert set_threads(1) == 2
    with pytest.raises(ValueError, match="thread"):
        set_threads(0)


def test_bad_inputs(clustered) -> None:
    q, db = clustered
    with pytest.raises(TypeError, match="float32"):
        search(q.astype(np.float64), db)
    with pytest.raises(ValueError, match="NaN"):
        bad = db.copy()
        bad[3, 0] = np.nan
        search(q, bad)
    with pytest.raises(ValueError, match="dimension"):
        search(q[:, :16].copy(), db)
    with pytest.raises(ValueError, match="shape"):
        search(q[0], db)
    with pytest.raises(ValueError, match="k:"):
        search(q, db, k=0)
    with pytest.raises(ValueError, match="index:"):
        search(q, db, index="lsh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index_options"):
        search(q, db, nprobe=3)
    with pytest.raises(ValueError, match="divisible"):
        search(q, db, index="ivfpq", m=5)
    with pytest.raises(ValueError, match="nlist"):
        search(q[:, :], db[:10], index="ivf", nlist=50)
    with pytest.raises(ValueError, match="train_size"):
        search(q, db, index="ivfsq8", nlist=16, train_size=8)
    with pytest.raises(ValueError, match="rerank"):
        search(q, db, index="ivfpq_rerank", m=8, nbits=4, rerank=-1)
    with pytest.raises(ValueError, match="index_options"):
        search(q, db, index="ivf", rerank=2)
    with pytest.raises(ValueError, match="ranks"):
        alpha_qe(q, db, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="alpha"):
        alpha_dba(db, alpha=-1.0)
