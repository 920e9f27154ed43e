"""Search latency, memory and recall@k: faiss flat / IVF / IVF-PQ / HNSW vs numpy brute force.

Data: clustered synthetic descriptors (unit centres + Gaussian noise, L2-normalised, float32), the
structure real embeddings have (recall on i.i.d. noise means nothing). Queries are fresh draws from
the same clusters, not database members. The peers' way is the baseline: `q @ db.T` with numpy,
then a full `np.argsort` of every row (cirtorch, revisitop, CVNet). faiss indexes go through
`msvlad.evaluation.search.build_index` / `search_index` with the library's default options unless
overridden.
recall@k = |top-k of the method ∩ exact top-k| / k, averaged over queries (exact = faiss flat).

Memory per method: `index_mib` is the resident memory the built index keeps (RSS after build minus
before, CPU) or its allocation (CUDA does not apply: faiss-cpu); `search_peak_mib` the peak extra
memory while searching (see benchmarks.common.PeakMemory).

    python -m benchmarks.bench_search                          # N = 10k, 30k, 100k
    python -m benchmarks.bench_search --sizes 1000000 --methods flat,ivf,ivfpq,hnsw
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    MIB,
    PeakMemory,
    base_parser,
    check_positive,
    format_table,
    int_list,
    new_figure,
    plot_path,
    ratio,
    report,
    resident_bytes,
    save_figure,
    setup_run,
    str_list,
    time_interleaved,
    write_results,
)
from msvlad.evaluation.search import build_index, search_index

log = logging.getLogger(__name__)

NAME = "bench_search"
METHODS = ("numpy", "flat", "ivf", "ivfpq", "hnsw")


def clustered_descriptors(
    n: int,
    dim: int,
    centres: np.ndarray,
    noise: float,
    rng: np.random.Generator,
    chunk: int = 65536,
) -> np.ndarray:
    """(n, dim) float32 rows: a random centre + noise * N(0, I/dim), L2-normalised, in chunks."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        assign = rng.integers(0, len(centres), size=stop - start)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(
            noise / np.sqrt(dim)
        )
        block += centres[assign]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def make_centres(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Random unit centres (count, dim) float32."""
    c = rng.standard_normal((count, dim), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def numpy_search(q: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    """The peers' brute force: full score matrix, full argsort per query; (n_q, k) indices."""
    scores = q @ db.T  # (n_q, N)
    return np.argsort(-scores, axis=1)[:, :k]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k, with found and exact (n_q, k)."""
    k = exact.shape[1]
    hits = [
        len(np.intersect1d(f[f >= 0], e, assume_unique=False))
        for f, e in zip(found, exact, strict=True)
    ]
    return float(np.mean(hits) / k)


def index_options(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Options for `build_index` from the command line (unset: library defaults)."""
    opts: dict[str, Any] = {}
    if method in ("ivf", "ivfpq"):
        if args.nlist:
            opts["nlist"] = args.nlist
        if args.nprobe:
            opts["nprobe"] = args.nprobe
    if method == "ivfpq" and args.pq_m:
        opts["m"] = args.pq_m
    if method == "hnsw":
        opts.update(M=args.hnsw_m, efSearch=args.ef_search)
    return opts


def bench_size(
    n: int, args: argparse.Namespace, rng: np.random.Generator, device: torch.device
) -> list[dict[str, Any]]:
    """Rows for one database size: build time, per-query latency, memory, recall@k per method."""
    n_centres = args.centres or max(10, n // 200)  # clusters larger than k keep recall@k meaningful
    centres = make_centres(n_centres, args.dim, rng)
    db = clustered_descriptors(n, args.dim, centres, args.noise, rng)
    q = clustered_descriptors(args.queries, args.dim, centres, args.noise, rng)
    k = min(args.k, n)
    built: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        if method == "numpy":
            rows[method] = {"build_s": 0.0, "index_mib": n * args.dim * 4 / MIB}
            continue
        opts = index_options(method, args)
        if method == "ivfpq" and "nbits" not in opts and n < 256:
            # tiny databases: fewer PQ centroids than vectors
            opts["nbits"] = max(1, int(np.log2(n)))
        gc.collect()
        rss0 = resident_bytes()
        t0 = time.perf_counter()
        try:
            built[method] = build_index(db, method, **opts)
        except ValueError as err:
            log.warning("N=%d: %s skipped (%s)", n, method, err)
            continue
        build_s = time.perf_counter() - t0
        rows[method] = {
            "build_s": build_s,
            "index_mib": max(0, resident_bytes() - rss0) / MIB,
            "options": dict(built[method].options),
        }
        log.info("N=%d: built %s in %.1fs", n, method, build_s)

    results: dict[str, np.ndarray] = {}

    def runner(method: str, q: np.ndarray = q, db: np.ndarray = db) -> Any:
        if method == "numpy":
            return lambda: results.__setitem__(method, numpy_search(q, db, k))
        index = built[method]
        return lambda: results.__setitem__(method, search_index(index, q, k)[0].T)

    fns = {m: runner(m) for m in rows}
    timings = time_interleaved(fns, repeats=args.repeats, warmup=args.warmup)
    exact = results["flat"] if "flat" in results else numpy_search(q, db, k)
    out = []
    for method, row in rows.items():
        with PeakMemory(device) as mem:
            fns[method]()
        seconds = timings[method].median
        out.append(
            {
                "n": n,
                "dim": args.dim,
                "method": method,
                "queries": args.queries,
                "k": k,
                "build_s": row["build_s"],
                "ms_per_query": 1000.0 * seconds / args.queries,
                "search_s": seconds,
                "index_mib": row["index_mib"],
                "search_peak_mib": mem.peak_mib,
                "recall": recall_at_k(results[method], exact),
                "options": row.get("options", {}),
            }
        )
    base = next((r for r in out if r["method"] == "numpy"), None)
    flat = next((r for r in out if r["method"] == "flat"), None)
    for r in out:
        r["speedup_vs_numpy"] = ratio(base["search_s"], r["search_s"]) if base else None
        r["speedup_vs_flat"] = ratio(flat["search_s"], r["search_s"]) if flat else None
    return out


def plot(rows: list[dict[str, Any]], path: Any, k: int) -> Any:
    """Latency per query vs N, and recall@k vs latency, per method."""
    fig, axes = new_figure(ncols=3)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for m in methods:
        sel = sorted((r for r in rows if r["method"] == m), key=lambda r: r["n"])
        axes[0][0].plot(
            [r["n"] for r in sel], [r["ms_per_query"] for r in sel], marker="o", label=m
        )
        axes[0][1].plot(
            [r["n"] for r in sel], [max(r["index_mib"], 1e-3) for r in sel], marker="o", label=m
        )
        axes[0][2].scatter([r["ms_per_query"] for r in sel], [r["recall"] for r in sel], label=m)
    for ax, ylabel, title in (
        (axes[0][0], "ms / query", "search latency"),
        (axes[0][1], "MiB", "index memory"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("database size N")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax = axes[0][2]
    ax.set_xscale("log")
    ax.set_xlabel("ms / query")
    ax.set_ylabel(f"recall@{k}")
    ax.set_title("recall vs latency (all N)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Command-line options of this benchmark."""
    p = base_parser(NAME, __doc__.splitlines()[0])
    p.add_argument(
        "--sizes", type=int_list, default=[10_000, 30_000, 100_000], help="database sizes N"
    )
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--k", type=int, default=100, help="neighbours per query (recall@k)")
    p.add_argument("--methods", type=str_list, default=list(METHODS), help=",".join(METHODS))
    p.add_argument(
        "--centres", type=int, default=0, help="cluster centres (0: N / 200, at least 10)"
    )
    p.add_argument(
        "--noise", type=float, default=1.0, help="noise norm relative to the unit centre"
    )
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: library default 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=0, help="IVF lists probed (0: library default 16)")
    p.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantizers (0: library default D/8)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=128)
    args = p.parse_args(argv)
    check_positive(p, args, "repeats", "dim", "queries", "k")
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    return args, p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the search benchmark; print the table, write JSON + PNG, return the record."""
    args, _ = parse_args(argv)
    device = setup_run(args)
    if device.type == "cuda":
        log.info("faiss-cpu and numpy search run on the CPU; the device choice does not apply")
        device = torch.device("cpu")
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        rows += bench_size(n, args, rng, device)
    columns = [
        "n",
        "method",
        "build_s",
        "ms_per_query",
        "speedup_vs_numpy",
        "speedup_vs_flat",
        "recall",
        "index_mib",
        "search_peak_mib",
    ]
    report(format_table(rows, columns, headers={"recall": f"recall@{args.k}"}), args)
    record = write_results(
        args.out,
        NAME,
        args,
        device,
        {
            "rows": rows,
            "baselines": {
                "speedup_vs_numpy": "numpy q @ db.T + full argsort time / this method's",
                "speedup_vs_flat": "faiss IndexFlatIP search time / this method's search time",
                "recall": "mean |top-k ∩ exact top-k| / k, exact = faiss flat",
            },
        },
    )
    plot(rows, plot_path(args.out), args.k)
    return record


if __name__ == "__main__":
    from msvlad.runtime import setup_logging

    setup_logging()
    main()
