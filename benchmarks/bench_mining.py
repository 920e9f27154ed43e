"""Mining-round cost vs pool size: the difficulty miner's top-k and faiss paths vs a full sort.

One mining round of `msvlad.mining.difficulty.DifficultyMiner` (paper defaults: margin 0.1, delta
0.02,
threshold 20, semi-hard probability 0.5, 256 triplets) on a synthetic class-balanced pool of N
L2-normalised descriptors (`--images-per-class` images per class around a random centre, Gaussian
noise scaled so that the loss window does catch triplets). Methods:

- topk:      `topk_neighbors(backend="torch")`: on CUDA chunked torch.topk candidates + float64
             re-scoring, memory O(chunk * N + N * k); on the CPU, for pools up to 64 (k + slack)
             rows, float64 GEMM blocks of the distinct rows (`msvlad.mining.neighbors`);
- candidates: the torch candidate path forced (what CUDA runs, and the CPU for large pools);
- faiss:     `topk_neighbors(backend="faiss")`, IndexFlatIP candidates (CPU), same re-scoring;
- full_sort: the paper code's way and the baseline: the full N x N float32 similarity matrix,
             every row fully sorted (torch.sort), then the same rule walked over the full lists.

Speed and memory are reported as ratios to full_sort measured in the same process. Peak memory is
`benchmarks.common.PeakMemory`: on CUDA the peak of `torch.cuda.max_memory_allocated` above the
allocation at the start (the tensors the round creates); on the CPU the resident-set high-water mark
(VmHWM reset through /proc/self/clear_refs) minus the resident set at the start, which covers torch,
numpy and faiss allocations alike. `same_triplets` says whether the method mined exactly the
triplets of topk (full_sort ranks float32 values, so a near-tie may rarely make it differ).

    python -m benchmarks.bench_mining --sizes 1000 4000 16000 --dims 2048 \
        --out results/bench/mining.json
    python -m benchmarks.bench_mining --sizes 500 1000 --dims 64          # seconds
    python -m benchmarks.bench_mining --device cpu --sizes 320 1000 2000 4000 --dims 2048 5120 \
        --methods topk candidates full_sort --out results/bench/mining_cpu_dense.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks import common
from benchmarks.common import Panel
from msvlad.mining import neighbors
from msvlad.mining.difficulty import DifficultyMiner, difficulty_candidates, first_per_class

log = logging.getLogger(__name__)

NAME = "bench_mining"
METHODS = ("topk", "candidates", "faiss", "full_sort")
BASELINE = "full_sort"
RATIO = "ratio to the full-sort baseline (same run)"
BASELINES: dict[str, str] = {
    "time_ratio": "median round time / full_sort's, same process and pool",
    "mem_ratio": "this method's peak extra memory / full_sort's",
    "same_triplets": "exactly the (anchor, positive, negative) triplets of topk",
}


def make_pool(
    n: int, dim: int, images_per_class: int, noise: float, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) unit descriptors, `images_per_class` per class around random unit centres; labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // images_per_class
    labels = labels[torch.randperm(n, generator=g)]
    centres = torch.nn.functional.normalize(
        torch.randn(int(labels.max()) + 1, dim, generator=g), dim=1
    )
    noise_vec = torch.randn(n, dim, generator=g) * (noise / math.sqrt(dim))
    desc = torch.nn.functional.normalize(centres[labels] + noise_vec, dim=1)
    return desc.to(device), labels.to(device)


def auto_noise(dim: int) -> float:
    """Noise at which the paper's loss window catches triplets: the within-class cosine
    1 / (1 + noise^2) is then near the nearest other-class cosine, a few times 1 / sqrt(D)."""
    return 0.6 * dim**0.25


def full_sort_round(
    desc: torch.Tensor, labels: torch.Tensor, miner: DifficultyMiner, seed: int, chunk: int = 1024
) -> torch.Tensor:
    """Baseline round: full similarity matrix, full row sort, the difficulty rule on the full lists.

    Draws the same coins and anchor order as `DifficultyMiner(seed=seed)`; returns (3, T) a/p/n.
    """
    n = desc.shape[0]
    g = torch.Generator().manual_seed(seed)
    coins = (torch.rand(n, generator=g) < miner.semi_hard_prob).to(desc.device)
    order = torch.randperm(n, generator=g).to(desc.device)
    sims = desc @ desc.T  # (N, N) float32
    sims.fill_diagonal_(-math.inf)
    sims, idx = torch.sort(sims, dim=1, descending=True, stable=True)  # (N, N) each
    sims, idx = sims[:, :-1], idx[:, :-1]  # self sorted last
    keep = torch.zeros(n, dtype=torch.bool, device=desc.device)
    p_idx = torch.zeros(n, dtype=torch.long, device=desc.device)
    n_idx = torch.zeros(n, dtype=torch.long, device=desc.device)
    for start in range(0, n, chunk):  # walk in row blocks so the walk's temporaries stay small
        rows = slice(start, min(n, start + chunk))
        cand = difficulty_candidates(
            sims[rows].double(),
            idx[rows],
            labels,
            coins[rows],
            anchor_labels=labels[rows],
            margin=miner.margin,
            delta=miner.delta,
            threshold=miner.threshold,
        )
        keep[rows], p_idx[rows], n_idx[rows] = cand["keep"], cand["p_idx"], cand["n_idx"]
    chosen = first_per_class(order, keep, labels, miner.triplets_per_round)
    return torch.stack([chosen, p_idx[chosen], n_idx[chosen]]).cpu()


def bench_pool(
    n: int, dim: int, args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """Rows for one (N, D): median round time, peak memory and triplets per method."""
    noise = args.noise or auto_noise(dim)
    desc, labels = make_pool(n, dim, args.images_per_class, noise, args.seed, device)
    miners = {m: _miner(args, backend="faiss" if m == "faiss" else "torch") for m in args.methods}
    mined: dict[str, torch.Tensor] = {}

    def runner(method: str) -> Any:
        if method == "full_sort":
            return lambda: mined.__setitem__(
                method, full_sort_round(desc, labels, miners[method], args.seed)
            )

        def mine() -> None:
            # a fresh miner per call: every repeat mines with the same seed, like full_sort
            forced = candidate_path() if method == "candidates" else contextlib.nullcontext()
            with forced:
                res = _miner(args, backend=miners[method].backend).mine(desc, labels)
            mined[method] = torch.stack(res.as_tuple())

        return mine

    fns = {m: runner(m) for m in args.methods}
    timings = common.time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=device)
    rows = []
    for method in args.methods:
        with common.PeakMemory(device) as mem:
            fns[method]()
        gc.collect()
        ref = mined.get("topk")
        rows.append(
            {
                "n": n,
                "dim": dim,
                "noise": noise,
                "method": method,
                "time_s": timings[method].median,
                "time_min_s": timings[method].best,
                "timing": timings[method].to_json(),
                "peak_mib": mem.peak_mib,
                "triplets": int(mined[method].shape[1]),
                "same_triplets": bool(ref is not None and torch.equal(mined[method], ref)),
            }
        )
    base = next((r for r in rows if r["method"] == BASELINE), None)
    for r in rows:
        r["time_ratio"] = common.ratio(r["time_s"], base["time_s"]) if base else None
        r["mem_ratio"] = common.ratio(r["peak_mib"], base["peak_mib"]) if base else None
    return rows


@contextlib.contextmanager
def candidate_path() -> Iterator[None]:
    """Make the torch backend take float32 candidates + float64 re-scoring on the CPU too."""
    saved = neighbors._DENSE_ROWS_PER_CANDIDATE
    neighbors._DENSE_ROWS_PER_CANDIDATE = 0
    try:
        yield
    finally:
        neighbors._DENSE_ROWS_PER_CANDIDATE = saved


def _miner(args: argparse.Namespace, backend: str) -> DifficultyMiner:
    return DifficultyMiner(
        margin=args.margin,
        delta=args.delta,
        threshold=args.threshold,
        semi_hard_prob=args.semi_hard_prob,
        triplets_per_round=args.triplets,
        seed=args.seed,
        backend=backend,
        chunk_size=args.chunk_size,
    )


def figure(record: dict[str, Any]) -> Any:
    """Round time, its ratio to the full sort, and peak memory against pool size, per method."""
    rows, line, pool = record["rows"], "{method} (D={dim})", "pool size N"
    ratio = (pool, "time / full_sort", RATIO)
    return common.draw_panels(
        [
            (rows, Panel("n", "time_s", line, (pool, "s (median)", "round time"), True, True)),
            (rows, Panel("n", "time_ratio", line, ratio, xlog=True, ylog=True, reference=1)),
            (rows, Panel("n", "peak_mib", line, (pool, "MiB", "peak extra memory"), True, True)),
        ],
        "one difficulty-mining round (paper rule) on a synthetic class-balanced pool",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of this benchmark."""
    p = common.base_parser(NAME, __doc__.splitlines()[0])
    p.set_defaults(out=common.RESULTS_DIR / "mining.json", repeats=2, warmup=0)
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000], help="pool sizes N"
    )
    p.add_argument("--dims", type=int, nargs="+", default=[2048], help="descriptor dimensions D")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--images-per-class", type=int, default=15)
    p.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="noise norm relative to the unit centre (0: 0.6 * D ** 0.25, which yields triplets)",
    )
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--delta", type=float, default=0.02)
    p.add_argument("--threshold", type=int, default=20)
    p.add_argument("--semi-hard-prob", type=float, default=0.5)
    p.add_argument("--triplets", type=int, default=256, help="triplets per round (cap)")
    p.add_argument("--chunk-size", type=int, default=4096, help="rows scored at once by topk")
    args = p.parse_args(argv)
    common.check_positive(
        p, args, "repeats", "images_per_class", "threshold", "triplets", "chunk_size"
    )
    if min(args.sizes) < 2 * args.images_per_class or min(args.dims) < 1:
        p.error(
            f"--sizes: need N >= 2 * images-per-class ({2 * args.images_per_class}); --dims: D >= 1"
        )
    return args


def measure(run: common.Run) -> dict[str, Any]:
    """Every (D, N) pool; the table printed, the rows returned."""
    args, device = run.args, run.device
    # load faiss/BLAS outside the timings
    warm_desc, warm_labels = make_pool(200, 16, 5, 1.0, 0, device)
    for backend in ("torch", "faiss"):
        DifficultyMiner(backend=backend).mine(warm_desc, warm_labels)
    rows: list[dict[str, Any]] = []
    for dim in args.dims:
        for n in args.sizes:
            log.info("pool N=%d D=%d", n, dim)
            rows += bench_pool(n, dim, args, device)
    common.print_table(
        rows,
        "n dim method time_s time_min_s time_ratio peak_mib mem_ratio triplets same_triplets",
        args,
        headers={
            "time_s": "time_s (median)",
            "time_min_s": "time_s (min)",
            "time_ratio": "time/full_sort",
            "mem_ratio": "mem/full_sort",
            "same_triplets": "same as topk",
        },
    )
    return {"rows": rows, "baselines": BASELINES}


main = common.entry_point(NAME, parse_args, measure, figure)

if __name__ == "__main__":
    common.script(main)
