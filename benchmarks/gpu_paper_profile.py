"""The paper profile on one GPU: training step, mining round (full and amortised), extraction.

A prepared script for a CUDA machine (random weights and images: the timings do not depend on
them), with the paper profile's parameters (params.paper.yaml: ResNet-101, 512 px, K 64, split
512, 6 triplets per step at its micro-batch and precision, pool 8000 of 15 per class, 256 triplets
per round, the difficulty miner with its backend):

1. step: one optimiser step of `train.batch_triplets` triplets as the trainer takes it
   (`benchmarks.bench_train.train_step`), at the profile's micro-batch and precision, and at
   micro-batch 6 with bf16 autocast;
2. round: describe the pool (batches of `extract.batch_size`, the profile's pool precision) and
   mine it; for each refresh fraction f, the amortised round of `msvlad.training.bank`: describe
   ceil(f P) images, take the rest from a bank holding the previous round's descriptors, mine.
   The round's mining share is (describe + mine) / (describe + mine + ceil(T / batch) steps);
   the miner also runs with the torch backend on the GPU;
3. extraction: images per second of the network forward at the training size, fp32 and fp16
   autocast (an untrained network can overflow fp16: the timing stands, the values do not);
4. pooling: multi-scale NetVLAD (fused and unfused) / backbone forward (`bench_pooling`), fp32
   and bf16 autocast;
5. coverage: how much of each round's pool a bank could serve with the profile's pool draws on a
   label set of GLDv2-clean's size, and with rolling draws per fraction (no network:
   `bank_coverage`). The amortised rounds of part 2 (the rest of the pool from the bank) are what
   rolling draws give at that scale; independent draws find about 1 % of a pool in the bank.

Writes results/bench/gpu_paper_profile.json (or --out) and its figure beside it.
`--device cpu --image-size N` measures on the CPU at a smaller image size (the embedding then
weighs less against the miner than at 512 px); `--parts` picks parts. `--smoke` runs every part on
the CPU at toy sizes (32 px, a 12-image pool, one repeat, 20 coverage rounds): the tests run it.

    python -m benchmarks.gpu_paper_profile                      # on a CUDA machine, a few minutes
    python -m benchmarks.gpu_paper_profile --device cpu --image-size 64 \
        --parts steps,rounds,coverage --round-repeats 1 --round-warmup 0 \
        --out results/bench/paper_round_share_cpu.json
    python -m benchmarks.gpu_paper_profile --smoke --out /tmp/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import torch

from benchmarks import common
from benchmarks.bench_pooling import bench_setting
from benchmarks.bench_train import random_triplets, train_step
from benchmarks.common import ratio, synchronize, time_call
from msvlad.config import Params, load_params, with_overrides
from msvlad.mining.pool import ClassBalancedPool, at_pool_precision, pool_autocast_fp16
from msvlad.nn.model import RetrievalNet, build_model
from msvlad.paths import ROOT
from msvlad.training.bank import BANK_BYTES, DescriptorBank, describe_pool
from msvlad.training.trainer import make_miner

log = logging.getLogger(__name__)

NAME = "gpu_paper_profile"
SMOKE = {"image_size": 32, "pool_size": 12, "images_per_class": 3, "triplets_per_round": 2}


def profile_params(smoke: bool, image_size: int | None = None) -> Params:
    """params.paper.yaml with random weights (toy sizes with `smoke`; another image size)."""
    params = load_params(ROOT / "params.paper.yaml")
    params = with_overrides(params, model={"pretrained": False})
    if image_size:
        params = with_overrides(params, model={"image_size": image_size})
    if smoke:
        params = with_overrides(
            params,
            model={"image_size": SMOKE["image_size"]},
            miner={k: SMOKE[k] for k in ("pool_size", "images_per_class", "triplets_per_round")},
            train={"batch_triplets": 1},
            extract={"batch_size": 4},
        )
    return params


def bench_steps(model: RetrievalNet, params: Params, device: torch.device, args) -> list[dict]:
    """Seconds per optimiser step: the profile's micro-batch and precision, and mb6 bf16."""
    cfg, size = params.train, params.model.image_size
    rows = []
    configs = [(cfg.micro_batch, cfg.amp and device.type == "cuda")]
    if device.type == "cuda":
        configs.append((cfg.batch_triplets, True))
    for micro, amp in configs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        model.train()
        images = random_triplets(cfg.batch_triplets, size, device, channels_last=True)

        def step(micro: int = micro, amp: bool = amp, opt: Any = opt, images: Any = images) -> Any:
            return train_step(
                model, opt, images, micro_batch=micro, margin=params.miner.margin, amp=amp
            )

        t = time_call(step, repeats=args.repeats, warmup=args.warmup, device=device)
        mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows.append(
            {
                "micro_batch": micro,
                "amp_bf16": amp,
                "triplets": cfg.batch_triplets,
                "step_s": t.to_json(),
                "triplets_per_s": cfg.batch_triplets / t.median,
                "peak_mib": mib,
            }
        )
    return rows


def pool_describer(model: RetrievalNet, params: Params, device: torch.device) -> Any:
    """`describe(indices, failures)` of random images, batched and at the profile's precision."""
    size, batch = params.model.image_size, params.extract.batch_size
    precision = params.miner.pool_precision
    fp16 = pool_autocast_fp16(precision) and device.type == "cuda"

    @torch.no_grad()
    def describe(idx: np.ndarray, failures: dict[int, str]) -> torch.Tensor:
        model.eval()
        out = []
        for start in range(0, len(idx), batch):
            x = torch.rand(min(batch, len(idx) - start), 3, size, size, device=device)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
                out.append(model(x).float())
        desc = torch.cat(out) if out else torch.zeros(0, model.raw_dim, device=device)
        return at_pool_precision(desc, precision)

    return describe


def bench_rounds(
    model: RetrievalNet, params: Params, device: torch.device, step_s: float, args
) -> list[dict]:
    """Full and amortised rounds: describe and mine seconds, the round's mining share."""
    m = params.miner
    pool_idx = np.arange(m.pool_size)
    labels = torch.from_numpy(pool_idx // m.images_per_class).to(device)
    describe = pool_describer(model, params, device)
    steps = math.ceil(m.triplets_per_round / params.train.batch_triplets)
    bank = DescriptorBank(m.pool_size, 0.5, m.pool_size, m.pool_precision)
    backends = [m.backend] + (["torch"] if device.type == "cuda" and m.backend != "torch" else [])
    fractions = sorted(set(args.fractions), reverse=True)  # 1.0 first: it fills the bank
    desc = None if fractions[0] >= 1.0 else describe(pool_idx, {})
    rows = []
    for fraction in fractions:
        for backend in backends:
            miner = make_miner(with_overrides(params, miner={"backend": backend}))
            times: dict[str, list[float]] = {"describe": [], "mine": []}
            for rep in range(args.round_warmup + args.round_repeats):
                bank.fraction = fraction
                if desc is not None:  # the previous round's descriptors: every image banked
                    bank.put(pool_idx, desc, step=0)
                synchronize(device)
                t0 = time.perf_counter()
                pool = describe_pool(bank, describe, pool_idx, step=1)  # f = 1: all re-embedded
                synchronize(device)
                t1 = time.perf_counter()
                mined = miner.mine(pool.desc, labels)
                synchronize(device)
                if rep >= args.round_warmup:
                    times["describe"].append(t1 - t0)
                    times["mine"].append(time.perf_counter() - t1)
                desc = pool.desc if desc is None else desc
            d, mi = float(np.median(times["describe"])), float(np.median(times["mine"]))
            rows.append(
                {
                    "fraction": fraction,
                    "backend": backend,
                    "pool": m.pool_size,
                    "refreshed": pool.refreshed,
                    "triplets": len(mined),
                    "describe_s": d,
                    "mine_s": mi,
                    "describe_s_runs": times["describe"],
                    "mine_s_runs": times["mine"],
                    "steps_per_round": steps,
                    "train_s": steps * step_s,
                    "describe_share": ratio(d, d + mi + steps * step_s),
                    "mining_share": ratio(d + mi, d + mi + steps * step_s),
                }
            )
    return rows


def bank_coverage(
    params: Params, dim: int, rounds: int, seed: int = 0, fractions: tuple[float, ...] = ()
) -> dict[str, Any]:
    """How much of each round's pool a bank could serve at GLDv2-clean's scale.

    The profile's class-balanced pool drawn on a label set of GLDv2-clean's size (81,313 classes,
    1,580,470 images; the class sizes are synthetic, log-normal with that mean, at least 1): per
    round, the share of the pool described in the rounds a `DescriptorBank` of BANK_BYTES holds
    (its rows / the pool size, the most recent rounds) and in any earlier round, and the mean age
    in rounds of those ever described. The top-level fields are the profile's independent draws;
    `rolling` has the summary of rolling draws (`miner.pool_draw: rolling`) per fraction < 1.
    """
    m = params.miner
    rng = np.random.default_rng(seed)
    classes, images = 81_313, 1_580_470
    raw = rng.lognormal(0.0, 1.0, classes)
    sizes = np.maximum(1, np.round(raw * images / raw.sum())).astype(np.int64)
    labels = np.repeat(np.arange(classes), sizes)
    window = max(1, min(len(labels), max(m.pool_size, BANK_BYTES // (4 * dim))) // m.pool_size)

    def pools(draw: str = "independent", f: float = 1.0) -> ClassBalancedPool:
        args = (m.pool_size, m.images_per_class, seed, m.pool_classes, draw, f)
        return ClassBalancedPool(labels, *args)

    out: dict[str, Any] = {"classes": classes, "images": int(len(labels)), "bank_rounds": window}
    out.update(_coverage(pools(), len(labels), rounds, window))
    out["rolling"] = []
    for f in (f for f in fractions if f < 1.0):
        cover = _coverage(pools("rolling", f), len(labels), rounds, window)
        out["rolling"].append({"fraction": f, **cover["summary"], "in_bank": cover["in_bank"]})
    return out


def _coverage(pools: ClassBalancedPool, n: int, rounds: int, window: int) -> dict[str, Any]:
    """Per round: share of the pool in a bank of `window` rounds, ever described, mean age."""
    last = np.full(n, -1, dtype=np.int64)
    in_bank, ever, age = [], [], []
    for r in range(rounds):
        idx = pools.sample(r)
        seen = last[idx]
        in_bank.append(float(np.mean((seen >= 0) & (seen >= r - window))))
        ever.append(float(np.mean(seen >= 0)))
        age.append(float(np.mean(r - seen[seen >= 0])) if (seen >= 0).any() else float("nan"))
        last[idx] = r
    tail = slice(len(ever) // 2, None)  # the second half of the run
    ages = [a for a in age[tail] if not math.isnan(a)]
    return {
        "in_bank": in_bank,
        "ever_described": ever,
        "mean_age_rounds": age,
        "summary": {
            "in_bank_mean": float(np.mean(in_bank)),
            "ever_described_second_half": float(np.mean(ever[tail])),
            "age_rounds_second_half": float(np.mean(ages)) if ages else float("nan"),
            "images_seen": int((last >= 0).sum()),
        },
    }


def bench_extraction(model: RetrievalNet, params: Params, device: torch.device, args) -> list:
    """Images per second of the eval forward at the training size, fp32 and fp16 autocast."""
    size, batch = params.model.image_size, params.extract.batch_size
    x = torch.rand(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    model.eval()
    rows = []
    for fp16 in [False] + ([True] if device.type == "cuda" else []):

        @torch.no_grad()
        def forward(fp16: bool = fp16) -> Any:
            with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
                return [model(x) for _ in range(args.extract_batches)]

        t = time_call(forward, repeats=args.repeats, warmup=args.warmup, device=device)
        images = batch * args.extract_batches
        rows.append(
            {
                "fp16": fp16,
                "batch": batch,
                "images": images,
                "seconds": t.to_json(),
                "images_per_s": images / t.median,
            }
        )
    return rows


PARTS = ("steps", "rounds", "extraction", "pooling", "coverage")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes, one repeat")
    parser.add_argument("--image-size", type=int, default=None, help="instead of the profile's")
    parser.add_argument("--parts", type=common.str_list, default=list(PARTS))
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25, 0.1, 0.05])
    parser.add_argument("--round-repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument("--round-warmup", type=int, default=None, help="default: --warmup")
    parser.add_argument("--extract-batches", type=int, default=20)
    parser.add_argument("--pool-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--coverage-rounds", type=int, default=2242, help="96,400 steps / 43")
    parser.set_defaults(device="cuda")
    args = parser.parse_args(argv)
    common.check_choices(parser, "--parts", args.parts, PARTS)
    if args.smoke:
        args.device, args.repeats, args.warmup, args.extract_batches = "cpu", 1, 0, 1
        args.pool_batches, args.fractions, args.coverage_rounds = [1], [1.0, 0.5], 20
    elif args.device != "cuda" and not args.image_size:
        parser.error(
            "--device: the paper profile at 512 px needs CUDA; on the CPU pass a smaller "
            "--image-size (or --smoke)"
        )
    args.round_repeats = args.repeats if args.round_repeats is None else args.round_repeats
    args.round_warmup = args.warmup if args.round_warmup is None else args.round_warmup
    return args


def measure(run: common.Run) -> dict[str, Any]:
    """Run the chosen parts, printing a table each; return the results."""
    args, device = run.args, run.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{NAME}: no CUDA device; --device cpu --image-size N, or --smoke")
    params = profile_params(args.smoke, args.image_size)
    model = build_model(params.model, pretrained=False).to(device)
    results: dict[str, Any] = {
        "smoke": args.smoke,
        "profile": {k: dataclasses.asdict(getattr(params, k)) for k in ("model", "miner", "train")},
    }
    if "steps" in args.parts or "rounds" in args.parts:
        results["steps"] = bench_steps(model, params, device, args)
        common.print_table(results["steps"], "micro_batch amp_bf16 triplets triplets_per_s", args)
    if "rounds" in args.parts:
        profile_step = results["steps"][0]["step_s"]["median_s"]  # the profile's micro-batch
        results["rounds"] = bench_rounds(model, params, device, profile_step, args)
        columns = "fraction backend refreshed describe_s mine_s train_s describe_share mining_share"
        common.print_table(results["rounds"], columns, args)
    if "extraction" in args.parts:
        results["extraction"] = bench_extraction(model, params, device, args)
        common.print_table(results["extraction"], "fp16 batch images images_per_s", args)
    if "pooling" in args.parts:
        results["pooling"] = [
            bench_setting(
                "paper",
                b,
                repeats=args.repeats,
                warmup=args.warmup,
                inner=1 if args.smoke else 20,
                device=device,
                image_size=params.model.image_size,
                amp=amp,
                backbone=model.backbone,
            )
            for b in args.pool_batches
            for amp in ([False, True] if device.type == "cuda" else [False])
        ]
        columns = "batch amp_bf16 fused_share_median fused_share_min unfused_share_median"
        common.print_table(results["pooling"], columns, args, decimals=4)
    if "coverage" in args.parts:
        cover = bank_coverage(
            params, model.raw_dim, args.coverage_rounds, fractions=tuple(args.fractions)
        )
        results["coverage"] = cover
        rows = [{"draw": "independent", **cover["summary"]}]
        rows += [{"draw": f"rolling {r['fraction']}", **r} for r in cover["rolling"]]
        common.print_table(rows, ["draw", *cover["summary"]], args)
    return results


def figure(record: dict[str, Any]) -> Any:
    """The round's describe and mining shares against the refresh fraction, per miner backend,
    and the share of each round's pool a bank holds at GLDv2-clean scale, per pool draw."""
    panels: list[tuple[list[dict[str, Any]], common.Panel]] = []
    rounds = record.get("rounds", [])
    if rounds:
        panels += [
            (
                rounds,
                common.Panel(
                    "fraction",
                    "mining_share",
                    "{backend}",
                    ("refresh fraction", "share", "(describe + mine) / round"),
                    reference=0.1,
                ),
            ),
            (
                rounds,
                common.Panel(
                    "fraction",
                    "describe_share",
                    "{backend}",
                    ("refresh fraction", "share", "describe / round"),
                ),
            ),
        ]
    cover = record.get("coverage")
    if cover:
        draws = [("independent", cover["in_bank"])]
        draws += [(f"rolling {r['fraction']}", r["in_bank"]) for r in cover.get("rolling", [])]
        every = max(1, len(cover["in_bank"]) // 200)  # about 200 points a line
        rows = [
            {"draw": name, "round": i, "in_bank": v}
            for name, series in draws
            for i, v in enumerate(series)
            if i % every == 0
        ]
        title = f"pool share in a bank, {cover['classes']:,} classes"
        panels.append((rows, common.Panel("round", "in_bank", "{draw}", ("round", "share", title))))
    size = record["profile"]["model"]["image_size"]
    return common.draw_panels(panels, f"paper profile at {size} px: a training round")


main = common.entry_point(NAME, parse_args, measure, figure)

if __name__ == "__main__":
    common.script(main)
