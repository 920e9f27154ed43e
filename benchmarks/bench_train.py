"""Training-step throughput (triplets/s) and the mining round's share of a training round.

Part 1: one optimiser step as `msvlad.training.trainer.Trainer.train_step` takes it (RetrievalNet
in train mode
with frozen BatchNorm, triplet loss on the (a, p, n) descriptors, gradients accumulated over
micro-batches, Adam) on random images, per configuration: micro-batch 1 vs 6 triplets per forward
(the step always holds --triplets triplets), fp32 vs AMP bf16, NCHW vs channels_last (the last two
on CUDA only). Speed is a ratio to fp32 with micro-batch 1 (the paper's memory-saving habit).

Part 2: one mining round = embed a pool of P images (eval, no grad, batches of extract.batch_size;
bf16 on CUDA) + mine with `msvlad.mining.registry.build_miner` (the profile's miner) vs the
ceil(T / triplets) optimiser steps that consume the round's T triplets (timed with the
profile's own micro-batch and AMP).
Images are random tensors; labels give P / images_per_class classes.

    python -m benchmarks.bench_train                                 # mini setting
    python -m benchmarks.bench_train --settings mini,paper --rounds 480:48,8000:256
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from typing import Any

import torch

from benchmarks import common
from benchmarks.common import Panel
from msvlad.config import Params
from msvlad.nn.loss import triplet_loss
from msvlad.nn.model import RetrievalNet, build_model

log = logging.getLogger(__name__)

NAME = "bench_train"
ROUND_SCALES = (0.25, 0.5, 1.0, 2.0)  # default rounds: the profile's pool and triplets times these
MINING_SHARE_GOAL = 0.10
RATIO = "speed / fp32 micro-batch 1 (same run)"
BASELINES: dict[str, str] = {
    "speedup_vs_base": "seconds per step of fp32, micro-batch 1 / this configuration's",
    "memory_vs_base": "peak memory of this configuration / fp32, micro-batch 1",
    "mining_share": "(embed + mine) / (embed + mine + ceil(T / triplets) steps)",
}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """One way of taking a training step."""

    micro_batch: int
    amp: bool = False  # bf16 autocast (CUDA only)
    channels_last: bool = False  # CUDA only

    @property
    def label(self) -> str:
        """Short name for tables and plots."""
        parts = [f"mb{self.micro_batch}", "bf16" if self.amp else "fp32"]
        if self.channels_last:
            parts.append("cl")
        return " ".join(parts)


def default_rounds(params: Params) -> list[tuple[int, int]]:
    """The profile's (pool size, triplets per round) scaled by ROUND_SCALES (>= 2 classes)."""
    m = params.miner
    return [
        (
            max(2 * m.images_per_class, round(m.pool_size * s)),
            max(1, round(m.triplets_per_round * s)),
        )
        for s in ROUND_SCALES
    ]


def step_configs(micro_batches: list[int], device: torch.device) -> list[StepConfig]:
    """fp32 at each micro-batch; on CUDA also bf16, and bf16 + channels_last."""
    configs = [StepConfig(mb) for mb in micro_batches]
    if device.type == "cuda":
        configs += [StepConfig(mb, amp=True) for mb in micro_batches]
        configs += [StepConfig(mb, amp=True, channels_last=True) for mb in micro_batches]
    return configs


def prepare_model(params: Params, config: StepConfig, device: torch.device) -> RetrievalNet:
    """Untrained network of the setting, on the device, in the step's memory format."""
    model = build_model(params.model, pretrained=False).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def train_step(
    model: RetrievalNet,
    optimizer: torch.optim.Optimizer,
    triplets: torch.Tensor,
    *,
    micro_batch: int,
    margin: float,
    amp: bool,
) -> float:
    """One Adam step on triplet images (T, 3, 3, S, S), gradients accumulated over micro-batches."""
    device = triplets.device
    total = len(triplets)
    loss_sum = 0.0
    for start in range(0, total, micro_batch):
        chunk = triplets[start : start + micro_batch]
        x = chunk.flatten(0, 1)  # (3m, 3, S, S): a, p, n interleaved
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            d = model(x).float().view(len(chunk), 3, -1)
            loss = triplet_loss(d[:, 0], d[:, 1], d[:, 2], margin)
        (loss * len(chunk) / total).backward()
        loss_sum += loss.item() * len(chunk)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / total


def random_triplets(
    count: int, size: int, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """Random images in [0, 1] shaped (count, 3, 3, size, size)."""
    x = torch.rand(count * 3, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.view(count, 3, 3, size, size)


def bench_steps(
    setting: str,
    params: Params,
    configs: list[StepConfig],
    device: torch.device,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Rows per step configuration: seconds per step, triplets/s, peak memory, ratio to fp32 mb1."""
    size = params.model.image_size
    states = {}
    for cfg in configs:
        model = prepare_model(params, cfg, device)
        opt = torch.optim.Adam(model.parameters(), lr=params.train.lr, weight_decay=0.0)
        images = random_triplets(args.triplets, size, device, cfg.channels_last)
        states[cfg.label] = (model, opt, images, cfg)

    def step(label: str) -> Any:
        model, opt, images, cfg = states[label]
        return lambda: train_step(
            model,
            opt,
            images,
            micro_batch=cfg.micro_batch,
            margin=params.miner.margin,
            amp=cfg.amp and device.type == "cuda",
        )

    # warm-up includes the first step, which allocates Adam's state
    timings = common.time_interleaved(
        {label: step(label) for label in states},
        repeats=args.repeats,
        warmup=max(1, args.warmup),
        device=device,
    )
    rows = []
    for label, (_, _, _, cfg) in states.items():
        with common.PeakMemory(device) as mem:
            step(label)()
        seconds = timings[label].median
        rows.append(
            {
                "setting": setting,
                "backbone": params.model.backbone,
                "image_size": size,
                "config": label,
                "micro_batch": cfg.micro_batch,
                "amp_bf16": cfg.amp,
                "channels_last": cfg.channels_last,
                "triplets": args.triplets,
                "seconds_per_step": seconds,
                "seconds_per_step_min": timings[label].best,
                "triplets_per_s": common.ratio(args.triplets, seconds),
                "peak_mib": mem.peak_mib,
            }
        )
    base = next(
        (r for r in rows if r["micro_batch"] == 1 and not r["amp_bf16"] and not r["channels_last"]),
        rows[0],
    )
    for r in rows:
        r["speedup_vs_base"] = common.ratio(base["seconds_per_step"], r["seconds_per_step"])
        r["memory_vs_base"] = common.ratio(r["peak_mib"], base["peak_mib"])
    states.clear()
    return rows


def profile_config(params: Params, device: torch.device, configs: list[StepConfig]) -> StepConfig:
    """The step configuration the profile trains with (its micro-batch; bf16 when amp on CUDA)."""
    want = StepConfig(params.train.micro_batch, amp=params.train.amp and device.type == "cuda")
    return want if want in configs else configs[0]


@torch.no_grad()
def describe_random_pool(
    model: RetrievalNet, pool: int, size: int, batch: int, device: torch.device
) -> torch.Tensor:
    """Describe `pool` random images in eval mode, batched like describe_images.

    On CUDA the autocast is bf16 where describe_images uses fp16: an untrained network's
    activations overflow fp16 (NaN descriptors) while pretrained ones do not; both run at the
    same tensor-core rate.
    """
    model.eval()
    out = []
    for start in range(0, pool, batch):
        x = torch.rand(min(batch, pool - start), 3, size, size, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(x).float())
    model.train()
    return torch.cat(out)


def bench_rounds(
    setting: str,
    params: Params,
    step_rows: list[dict[str, Any]],
    config: StepConfig,
    rounds: list[tuple[int, int]],
    device: torch.device,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Rows per (P, T): embed + mine seconds vs the steps of one round, and the mining share."""
    from msvlad.mining.registry import build_miner

    m = params.miner
    step_s = next(r["seconds_per_step"] for r in step_rows if r["config"] == config.label)
    model = prepare_model(params, config, device)
    # warm-up
    describe_random_pool(
        model, min(4, rounds[0][0]), params.model.image_size, params.extract.batch_size, device
    )
    rows = []
    for pool, triplets in rounds:
        common.synchronize(device)
        t0 = time.perf_counter()
        desc = describe_random_pool(
            model, pool, params.model.image_size, params.extract.batch_size, device
        )
        common.synchronize(device)
        t1 = time.perf_counter()
        labels = torch.arange(pool, device=desc.device) // m.images_per_class
        miner = build_miner(
            m.name,
            margin=m.margin,
            delta=m.delta,
            threshold=m.threshold,
            semi_hard_prob=m.semi_hard_prob,
            triplets_per_round=triplets,
            seed=args.seed,
            backend=args.miner_backend or m.backend,
        )
        mined = miner.mine(desc, labels)
        common.synchronize(device)
        t2 = time.perf_counter()
        steps = math.ceil(triplets / args.triplets)
        embed_s, mine_s, train_s = t1 - t0, t2 - t1, steps * step_s
        rows.append(
            {
                "setting": setting,
                "pool": pool,
                "round_triplets": triplets,
                "mined": len(mined),
                "miner": m.name,
                "backend": args.miner_backend or m.backend,
                "step_config": config.label,
                "steps": steps,
                "embed_s": embed_s,
                "mine_s": mine_s,
                "train_s": train_s,
                "mining_share": common.ratio(embed_s + mine_s, embed_s + mine_s + train_s),
                "mining_vs_training": common.ratio(embed_s + mine_s, train_s),
            }
        )
        log.info(
            "%s P=%d T=%d: embed %.2fs, mine %.2fs, %d steps %.2fs",
            setting,
            pool,
            triplets,
            embed_s,
            mine_s,
            steps,
            train_s,
        )
    return rows


def parse_rounds(text: str) -> list[tuple[int, int]]:
    """argparse type: "480:48,8000:256" -> [(480, 48), (8000, 256)] (pool size P : triplets T)."""
    out = []
    for part in text.split(","):
        try:
            p, t = (int(v) for v in part.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--rounds: expected P:T pairs like 480:48, got {part!r}"
            ) from None
        if p < 2 or t < 1:
            raise argparse.ArgumentTypeError(f"--rounds: need P >= 2 and T >= 1, got {part!r}")
        out.append((p, t))
    return out


def figure(record: dict[str, Any]) -> Any:
    """Triplets/s and speed-up over fp32 micro-batch 1 against the micro-batch; the mining share
    of a round against the pool size."""
    steps = [{**r, "precision": r["config"].split(" ", 1)[1]} for r in record["steps"]]
    rounds, line = record["rounds"], "{setting} {precision}"
    mb, pool = "triplets per forward (micro-batch)", "pool size P (triplets per round alike)"
    share = (pool, "(embed + mine) / round, %", "mining share of a round")
    goal = 100 * MINING_SHARE_GOAL
    speed = (mb, "speed", RATIO)
    return common.draw_panels(
        [
            (steps, Panel("micro_batch", "triplets_per_s", line, (mb, "triplets / s", "step"), 2)),
            (steps, Panel("micro_batch", "speedup_vs_base", line, speed, xlog=2, reference=1)),
            (
                rounds,
                Panel("pool", "mining_share", "{setting}", share, True, reference=goal, scale=100),
            ),
        ],
        "training step and mining round (untrained networks, random images)",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of this benchmark."""
    p = common.base_parser(NAME, __doc__.splitlines()[0])
    common.add_profile_options(p, ["mini"])
    p.add_argument(
        "--micro-batches", type=common.int_list, default=[1, 2, 3, 6], help="triplets per forward"
    )
    p.add_argument(
        "--triplets", type=int, default=6, help="triplets per optimiser step (train.batch_triplets)"
    )
    p.add_argument(
        "--rounds",
        type=parse_rounds,
        default=None,
        help="P:T pairs (pool size : triplets per round); default: each profile's miner values "
        f"scaled by {ROUND_SCALES}",
    )
    p.add_argument("--no-rounds", action="store_true", help="skip the mining-share part")
    p.add_argument(
        "--miner-backend",
        choices=("torch", "faiss"),
        default=None,
        help="override the profile's miner.backend",
    )
    args = p.parse_args(argv)
    common.check_positive(p, args, "repeats", "triplets")
    return args


def measure(run: common.Run) -> dict[str, Any]:
    """Steps and rounds of every setting; the tables printed."""
    args, device = run.args, run.device
    step_rows: list[dict[str, Any]] = []
    round_rows: list[dict[str, Any]] = []
    for s in args.settings:
        params = common.profile_params(s, common.setting_size(args, s))
        configs = step_configs(args.micro_batches, device)
        rows = bench_steps(s, params, configs, device, args)
        step_rows += rows
        if not args.no_rounds:
            rounds = args.rounds or default_rounds(params)
            round_rows += bench_rounds(
                s, params, rows, profile_config(params, device, configs), rounds, device, args
            )
    common.print_table(
        step_rows,
        "setting config image_size seconds_per_step seconds_per_step_min triplets_per_s "
        "speedup_vs_base peak_mib memory_vs_base",
        args,
    )
    common.print_table(
        round_rows,
        "setting pool round_triplets mined step_config steps embed_s mine_s train_s mining_share",
        args,
    )
    return {
        "steps": step_rows,
        "rounds": round_rows,
        "baselines": BASELINES,
    }


main = common.entry_point(NAME, parse_args, measure, figure)

if __name__ == "__main__":
    common.script(main)
