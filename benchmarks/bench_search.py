"""Search at R1M scale: recall@k against ms/query per faiss index family, index memory, build time.

Every index is built by `msvlad.evaluation.search.build_index` (the path `evaluate.index` takes)
with the library's defaults unless a sweep varies a search-time option: nprobe for the IVF
families, efSearch for HNSW, the re-ranking shortlist for IVF-PQ with exact re-ranking. A family is
built once per size and searched at each point of its sweep (`with_search_options`), so each line
of the figure is a recall-versus-latency curve.

Baselines, measured in the same process: exact search of the same queries reading the database
in place (`faiss.knn`, the kernel IndexFlatIP.search runs, without a second float32 copy), timed
round-robin with every sweep point of each family, so `speedup_vs_flat` compares runs taken under
the same load; `numpy` (the peers' way: `q @ db.T`, then a full argsort of every row) and `flat`
(the library's exact IndexFlatIP, built up to --copy-limit vectors) are rows timed the same way.
recall@k = |top-k of the method ∩ exact top-k| / k, averaged over queries.

Memory: `index_bytes` is the serialised faiss index (codes, lists, graph, quantisers), exact for
every family; `memory_vs_flat` divides it by the float32 database (N * D * 4). The re-ranking
families also read the database rows of their shortlist: the array given to `build_index`, here a
`np.memmap` of a .npy file above --memmap-above vectors (not counted: it is the stored
descriptors). Indexes are built one family at a time and freed, so at most the database and one
float32-sized index are held.

Data: landmark-like synthetic descriptors (`LandmarkModel`): Zipf-sized clusters around centres
that are themselves grouped, and a per-vector noise level, L2-normalised float32. Queries are fresh
draws of the same model. The model gives each query a continuum of neighbour similarities (the
similarity at ranks 1, 10, 100 and 1000 is recorded as `profile`), as real descriptors have;
i.i.d. Gaussian vectors have no neighbours and make every recall meaningless.
`--features results/evaluate/<method>/<dataset>/features.npz` adds a sanity point on real
descriptors (their q and db arrays, k capped at a quarter of the database).

    python -m benchmarks.bench_search                              # N = 10k, 30k, 100k, 300k
    nice -n 10 python -m benchmarks.bench_search --sizes 30000,100000,300000,1000000 \\
        --methods numpy,flat,ivf,ivfsq8,ivfpq,ivfpq_rerank,hnsw --restrict-above 300000 \\
        --features results/evaluate/msvlad/mini-test/features.npz
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks import common
from benchmarks.common import Panel
from msvlad.evaluation.search import (
    INDEX_KINDS,
    SearchIndex,
    build_index,
    search_index,
    set_threads,
    with_search_options,
)
from msvlad.storage import load_npz, write_json

log = logging.getLogger(__name__)

NAME = "bench_search"
METHODS = ("numpy", *INDEX_KINDS)
# the search-time sweeps of each family: one line of the figure per (option, values)
_NPROBE = ("nprobe", (4, 8, 16, 32, 64, 128))
SWEEPS: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {
    "ivf": (_NPROBE,),
    "ivfsq8": (_NPROBE,),
    "ivfpq": (_NPROBE,),
    "opq": (_NPROBE,),
    "ivfpq_rerank": (_NPROBE, ("rerank", (1, 2, 4, 8, 16, 32))),
    "hnsw": (("efSearch", (100, 128, 192, 256, 384, 512)),),  # searched with max(efSearch, k)
}
GOAL = {"recall": 0.95, "ms_per_query": 5.0, "memory_vs_flat": 0.25}
GOAL_MEMORY = GOAL["memory_vs_flat"]
BASELINES: dict[str, str] = {
    "speedup_vs_flat": "exact search time (same queries, round-robin) / this time",
    "recall": "mean |top-k ∩ exact top-k| / k",
    "memory_vs_flat": "serialised index bytes / (N * D * 4)",
}


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LandmarkModel:
    """Landmark-like descriptors: clusters (Zipf popularity) around grouped centres, noisy views.

    A vector is L2n(centre + s * N(0, I/D)) with s log-uniform in `noise`; centres are
    L2n(group + spread * N(0, I/D)), so clusters of one group are alike (similar buildings).
    """

    centres: np.ndarray  # (C, D) float32
    popularity: np.ndarray  # (C,) probabilities
    noise: tuple[float, float]

    @classmethod
    def make(
        cls,
        n: int,
        dim: int,
        rng: np.random.Generator,
        *,
        cluster_size: int = 50,
        zipf: float = 0.7,
        spread: float = 1.0,
        noise: tuple[float, float] = (0.5, 2.0),
    ) -> LandmarkModel:
        """n / cluster_size clusters in sqrt(clusters) groups; popularity (rank + 1)^-zipf."""
        clusters = max(2, n // cluster_size)
        groups = _unit(rng.standard_normal((max(2, round(clusters**0.5)), dim), dtype=np.float32))
        jitter = rng.standard_normal((clusters, dim), dtype=np.float32) * np.float32(
            spread / np.sqrt(dim)
        )
        centres = _unit(groups[rng.integers(0, len(groups), clusters)] + jitter)
        weights = np.arange(1, clusters + 1, dtype=np.float64) ** -zipf
        return cls(centres, weights / weights.sum(), noise)

    def fill(self, out: np.ndarray, rng: np.random.Generator, chunk: int = 32768) -> np.ndarray:
        """Write draws into out (an array or a memmap), chunk by chunk; return out."""
        n, dim = out.shape
        lo, hi = np.log(self.noise)
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            which = rng.choice(len(self.centres), size, p=self.popularity)
            scale = np.exp(rng.uniform(lo, hi, size)).astype(np.float32) / np.float32(np.sqrt(dim))
            block = rng.standard_normal((size, dim), dtype=np.float32) * scale[:, None]
            block += self.centres[which]
            out[start : start + size] = _unit(block)
        return out

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, D) float32 draws in memory."""
        return self.fill(np.empty((n, self.centres.shape[1]), dtype=np.float32), rng)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def database_array(n: int, dim: int, folder: Path | None) -> np.ndarray:
    """An (n, dim) float32 array: in memory, or a .npy memmap in folder (R1M: 8 GB on disk)."""
    if folder is None:
        return np.empty((n, dim), dtype=np.float32)
    return np.lib.format.open_memmap(folder / f"db_{n}x{dim}.npy", "w+", np.float32, (n, dim))


def release(nbytes: int) -> None:
    """Collect garbage (a freed index or database) when it is large enough to matter."""
    if nbytes > 2**28:
        gc.collect()


# ----------------------------------------------------------------------------- exact search


def numpy_search(q: np.ndarray, db: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """The peers' brute force: score matrix, full argsort per query; (n_q, k) indices.

    Queries go `block` at a time so an R1M score matrix stays small; the work is the same."""
    out = [np.argsort(-(q[i : i + block] @ db.T), axis=1)[:, :k] for i in range(0, len(q), block)]
    return np.concatenate(out)


def exact_search(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top k read in place from db (faiss.knn: IndexFlatIP's own kernel)."""
    return faiss.knn(q, db, k, metric=faiss.METRIC_INNER_PRODUCT)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k, with found and exact (n_q, k)."""
    k = exact.shape[1]
    hits = [
        len(np.intersect1d(f[f >= 0], e, assume_unique=False))
        for f, e in zip(found, exact, strict=True)
    ]
    return float(np.mean(hits) / k)


def similarity_profile(scores: np.ndarray) -> dict[str, float]:
    """Mean exact similarity at ranks 1, 10, 100, 1000 (those the search returned)."""
    return {
        f"rank_{r}": float(scores[:, r - 1].mean())
        for r in (1, 10, 100, 1000)
        if r <= scores.shape[1]
    }


# ----------------------------------------------------------------------------- one size


@dataclass
class Case:
    """One database with its queries and exact answers."""

    source: str
    db: np.ndarray
    q: np.ndarray
    k: int
    exact: np.ndarray  # (n_q, k) exact top-k ids
    profile: dict[str, float]


def make_case(source: str, db: np.ndarray, q: np.ndarray, k: int) -> Case:
    """Exact top-k of every query (and the similarity profile up to rank 1000)."""
    k = min(k, len(db))
    scores, ids = exact_search(q, db, min(len(db), max(k, 1000)))
    return Case(source, db, q, k, ids[:, :k], similarity_profile(scores))


def build_options(method: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build options from the command line; tiny databases get fewer PQ centroids."""
    opts: dict[str, Any] = {}
    if method == "hnsw":
        opts["M"] = args.hnsw_m
    if method in SWEEPS and SWEEPS[method][0] == "nprobe" and args.nlist:
        opts["nlist"] = args.nlist
    if method in ("ivfpq", "opq", "ivfpq_rerank"):
        if args.pq_m:
            opts["m"] = args.pq_m
        if n < 256 * 64:
            opts["nbits"] = max(1, min(8, int(np.log2(max(2, n // 64)))))
        if args.nlist:
            opts["nlist"] = args.nlist
    return opts


def sweep_points(index: SearchIndex) -> dict[tuple[str, str], SearchIndex]:
    """{(sweep, setting label): index handle} over the family's sweeps, the default included."""
    points: dict[tuple[str, str], SearchIndex] = {}
    for option, values in SWEEPS[index.kind]:
        for v in (*values, index.options[option]):
            if v == index.options[option]:
                points.setdefault((option, f"{option}={v}"), index)
            else:
                points[(option, f"{option}={v}")] = with_search_options(index, **{option: v})
    return points


def bench_family(
    method: str, case: Case, args: argparse.Namespace, search_threads: int
) -> list[dict[str, Any]]:
    """Build one family, time each sweep point round-robin with exact search, score recall."""
    n, dim = case.db.shape
    opts = build_options(method, n, args)
    before = set_threads(args.build_threads)
    t0 = time.perf_counter()
    try:
        index = build_index(case.db, method, **opts)
    except ValueError as err:
        log.warning("%s N=%d: %s skipped (%s)", case.source, n, method, err)
        return []
    finally:
        set_threads(before)
    build_s = time.perf_counter() - t0
    log.info("%s N=%d: built %s in %.1fs", case.source, n, method, build_s)
    set_threads(search_threads)
    points = {("exact", "exact"): index} if method == "flat" else sweep_points(index)
    found: dict[tuple[str, str], np.ndarray] = {}

    def runner(key: Any) -> Callable[[], None]:
        if key == "baseline":
            return lambda: exact_search(case.q, case.db, case.k)
        point = points[key]
        return lambda: found.__setitem__(key, search_index(point, case.q, case.k)[0].T)

    keys = [*points, "baseline"]
    timings = common.time_interleaved(
        {key: runner(key) for key in keys}, repeats=args.repeats, warmup=args.warmup
    )
    base = timings["baseline"]
    index_bytes = index.code_bytes
    rows = []
    seen_default = False
    for key, point in points.items():
        t = timings[key]
        is_default = point is index and not seen_default  # once, though every sweep holds it
        seen_default = seen_default or is_default
        rows.append(
            {
                "source": case.source,
                "n": n,
                "dim": dim,
                "method": method,
                "sweep": key[0],
                "setting": key[1],
                "value": point.options.get(key[0], 0),
                "default": is_default,
                "queries": len(case.q),
                "k": case.k,
                "recall": recall_at_k(found[key], case.exact),
                "ms_per_query": 1000.0 * t.median / len(case.q),
                "ms_per_query_min": 1000.0 * t.best / len(case.q),
                "speedup_vs_flat": common.ratio(base.median, t.median),
                "flat_ms_per_query": 1000.0 * base.median / len(case.q),
                "build_s": build_s,
                "index_bytes": index_bytes,
                "memory_vs_flat": common.ratio(index_bytes, n * dim * 4),
                "reads_database": bool(point.options.get("rerank")),
                "options": dict(point.options),
                "timing": t.to_json(),
            }
        )
    return rows


def bench_numpy(case: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The peers' numpy brute force, timed round-robin with exact faiss search."""
    found: dict[str, np.ndarray] = {}
    timings = common.time_interleaved(
        {
            "numpy": lambda: found.__setitem__("numpy", numpy_search(case.q, case.db, case.k)),
            "baseline": lambda: exact_search(case.q, case.db, case.k),
        },
        repeats=args.repeats,
        warmup=args.warmup,
    )
    t, base = timings["numpy"], timings["baseline"]
    n, dim = case.db.shape
    return [
        {
            "source": case.source,
            "n": n,
            "dim": dim,
            "method": "numpy",
            "sweep": "exact",
            "setting": "argsort",
            "value": 0,
            "default": True,
            "queries": len(case.q),
            "k": case.k,
            "recall": recall_at_k(found["numpy"], case.exact),
            "ms_per_query": 1000.0 * t.median / len(case.q),
            "ms_per_query_min": 1000.0 * t.best / len(case.q),
            "speedup_vs_flat": common.ratio(base.median, t.median),
            "flat_ms_per_query": 1000.0 * base.median / len(case.q),
            "build_s": 0.0,
            "index_bytes": n * dim * 4,
            "memory_vs_flat": 1.0,
            "reads_database": True,
            "options": {},
            "timing": t.to_json(),
        }
    ]


def bench_case(case: Case, args: argparse.Namespace, search_threads: int) -> list[dict[str, Any]]:
    """Every requested family on one database (flat only below --copy-limit)."""
    rows: list[dict[str, Any]] = []
    restricted = 0 < args.restrict_above < len(case.db)
    methods = [m for m in args.methods if not restricted or m in args.restricted_methods]
    if restricted:
        log.info("N=%d: families restricted to %s (--restrict-above)", len(case.db), methods)
    for method in methods:
        if method == "numpy":
            rows += bench_numpy(case, args)
        elif method == "flat" and len(case.db) > args.copy_limit:
            log.info(
                "N=%d: flat index skipped (a second float32 copy); see faiss.knn", len(case.db)
            )
        else:
            rows += bench_family(method, case, args, search_threads)
            release(case.db.nbytes)  # the family's index is freed before the next is built
    return rows


# ----------------------------------------------------------------------------- summary and figure


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per family at the largest synthetic N: the fastest point meeting the goal, if any."""
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    if not synthetic:
        return {}
    n = max(r["n"] for r in synthetic)
    out: dict[str, Any] = {"n": n, "goal": GOAL, "families": {}}
    largest = [r for r in synthetic if r["n"] == n]
    for method in dict.fromkeys(r["method"] for r in largest):
        sel = [r for r in largest if r["method"] == method]
        ok = [
            r
            for r in sel
            if r["recall"] >= GOAL["recall"]
            and r["ms_per_query"] <= GOAL["ms_per_query"]
            and r["memory_vs_flat"] <= GOAL["memory_vs_flat"]
        ]
        best = min(ok, key=lambda r: r["ms_per_query"]) if ok else None
        top = max(sel, key=lambda r: (r["recall"], -r["ms_per_query"]))
        out["families"][method] = {
            "meets_goal": best is not None,
            "fastest_meeting_goal": best and _brief(best),
            "best_recall": _brief(top),
        }
    return out


def _brief(row: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("setting", "recall", "ms_per_query", "memory_vs_flat", "build_s")
    return {key: row[key] for key in keys}


def figure(record: Mapping[str, Any]) -> Any:
    """Recall@k vs ms/query per family at the largest N, and, at each family's default setting,
    the speed-up over exact flat search, the build time and the index size against N."""
    rows = [r for r in record["rows"] if r["source"] == "synthetic"]
    k, dim, queries = (rows[0][key] for key in ("k", "dim", "queries")) if rows else ("?",) * 3
    top = max((r["n"] for r in rows), default=0)
    largest = [r for r in rows if r["n"] == top and r["method"] != "flat"]
    defaults = [r for r in rows if r["default"]]
    n, curve = "database size N", "{method} {sweep} ({memory_vs_flat:.0%} of flat)"
    tradeoff = ("ms / query (median)", f"recall@{k}", f"N = {top:,}: * default, green: goal")
    speed = (n, "exact time / this time", "speed-up over exact flat search (same run)")
    build = (n, "seconds", "build time (train on a sample + add)")
    size = (n, "index bytes / float32 database", "index size vs flat (dashed: goal)")
    fig = common.draw_panels(
        [
            (largest, Panel("ms_per_query", "recall", curve, tradeoff, True, order="value")),
            (defaults, Panel("n", "speedup_vs_flat", "{method}", speed, True, True, 1)),
            (defaults, Panel("n", "build_s", "{method}", build, True, True)),
            (defaults, Panel("n", "memory_vs_flat", "{method}", size, True, True, GOAL_MEMORY)),
        ],
        f"{dim}-D landmark-like descriptors, {queries} queries, k = {k}; "
        "every index built by msvlad.evaluation.search.build_index",
    )
    ax = fig.axes[0]
    ax.axvspan(ax.get_xlim()[0], GOAL["ms_per_query"], color="#e8f4e8", zorder=0)
    ax.axhline(GOAL["recall"], color="grey", ls="--", lw=1)
    for r in largest:
        if r["default"]:
            ax.plot(r["ms_per_query"], r["recall"], "k*", ms=7)
    return fig


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of this benchmark."""
    p = common.base_parser(NAME, __doc__.splitlines()[0])
    p.add_argument(
        "--sizes",
        type=common.int_list,
        default=[10_000, 30_000, 100_000, 300_000],
        help="database sizes N",
    )
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=100, help="neighbours per query (recall@k)")
    p.add_argument("--methods", type=common.str_list, default=list(METHODS), help=",".join(METHODS))
    p.add_argument(
        "--restrict-above",
        type=int,
        default=0,
        help="databases larger than this run only --restricted-methods (0: no restriction)",
    )
    p.add_argument(
        "--restricted-methods",
        type=common.str_list,
        default=["ivfsq8", "ivfpq_rerank"],
        help="the families run above --restrict-above (builds bounded at R1M on a few cores)",
    )
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: library default)")
    p.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantizers (0: library default)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--cluster-size", type=int, default=50, help="mean images per landmark")
    p.add_argument(
        "--build-threads",
        type=int,
        default=1,
        help="faiss threads while building (1: OpenMP k-means stalls on a shared machine)",
    )
    p.add_argument("--search-threads", type=int, default=0, help="faiss threads (0: all cores)")
    p.add_argument(
        "--memmap-above",
        type=int,
        default=400_000,
        help="databases larger than this live in a .npy memmap (--scratch)",
    )
    p.add_argument(
        "--copy-limit",
        type=int,
        default=400_000,
        help="above this N the flat index (a second float32 copy) is not built",
    )
    p.add_argument(
        "--scratch", type=Path, default=None, help="folder of the memmap (default: a temp folder)"
    )
    p.add_argument(
        "--features", type=Path, default=None, help="features.npz (q, db) of real descriptors"
    )
    args = p.parse_args(argv)
    common.check_positive(
        p, args, "repeats", "dim", "queries", "k", "build_threads", "cluster_size"
    )
    common.check_choices(p, "--methods", args.methods, METHODS)
    common.check_choices(p, "--restricted-methods", args.restricted_methods, METHODS)
    return args


def real_case(path: Path, k: int) -> Case:
    """The sanity point: a features.npz of real descriptors, k capped at a quarter of the db."""
    arrays = load_npz(path)
    missing = [key for key in ("q", "db") if key not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing} (expected q and db)")
    q, db = (np.ascontiguousarray(arrays[key], dtype=np.float32) for key in ("q", "db"))
    return make_case(
        f"real:{path.parent.parent.name}/{path.parent.name}", db, q, min(k, max(1, len(db) // 4))
    )


def measure(run: common.Run) -> dict[str, Any]:
    """Every synthetic size (the largest in a memmap), then the real features; table printed."""
    args = run.args
    search_threads = args.search_threads or faiss.omp_get_max_threads()
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    profiles = {}
    with tempfile.TemporaryDirectory(prefix="bench_search_", dir=args.scratch) as scratch:
        for n in args.sizes:
            model = LandmarkModel.make(n, args.dim, rng, cluster_size=args.cluster_size)
            t0 = time.perf_counter()
            folder = Path(scratch) if n > args.memmap_above else None
            db = model.fill(database_array(n, args.dim, folder), rng)
            case = make_case("synthetic", db, model.draw(args.queries, rng), args.k)
            log.info("N=%d: data and exact top-%d in %.1fs", n, case.k, time.perf_counter() - t0)
            profiles[str(n)] = case.profile
            rows += bench_case(case, args, search_threads)
            # what is done so far survives a crash of a later, larger size
            partial = Path(args.out).with_suffix(".partial.json")
            write_json(partial, common.json_safe({"rows": rows}))
            nbytes = db.nbytes
            del case, db
            release(nbytes)
        if args.features is not None:
            case = real_case(args.features, args.k)
            profiles[case.source] = case.profile
            rows += bench_case(case, args, search_threads)
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)  # the record follows
    common.print_table(
        rows,
        "source n method setting recall ms_per_query ms_per_query_min speedup_vs_flat "
        "memory_vs_flat build_s",
        args,
        headers={
            "recall": f"recall@{args.k}",
            "ms_per_query": "ms/query (median)",
            "ms_per_query_min": "ms/query (min)",
        },
        decimals={"speedup_vs_flat": 2, "build_s": 1},
    )
    return {
        "rows": rows,
        "profile": profiles,
        "summary": summarise(rows),
        "threads": {"build": args.build_threads, "search": search_threads},
        "baselines": BASELINES,
    }


main = common.entry_point(NAME, parse_args, measure, figure)

if __name__ == "__main__":
    common.script(main)
