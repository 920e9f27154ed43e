"""Extraction speed and peak memory: backbone alone vs + GeM, + NetVLAD, + multi-scale NetVLAD.

Part 1 (model forward on synthetic tensors): for each setting (mini: EfficientNet-Lite0 at 224 from
params.yaml; paper: ResNet-101 at 512, K=64, split 512 from params.paper.yaml) and batch size, times
(a) the backbone alone, (b) + GeM, (c) + single-scale NetVLAD, (d) + the paper's multi-scale pooled
NetVLAD. The pooling cost is timed separately on the cached feature map and reported as a ratio
to the backbone forward (goal of the paper's design: multi-scale NetVLAD < 10% of the backbone).
Networks are untrained (random weights): speed does not depend on the weight values.

Part 2 (end to end, `msvlad.evaluation.extract.describe_images`): generated JPEGs of mixed aspect
ratios
described with the square policy (batched), the max-side policy with aspect bucketing (batched),
and max-side at batch size 1 (the peer codes' habit), each with num_workers 0 and 2. Speed is a
ratio to max-side / batch 1 / 0 workers. Square images have more pixels than max-side ones at the
same `image_size`, so square vs max-side compares policies, not only batching.

    python -m benchmarks.bench_extraction                       # mini setting (+ paper on CUDA)
    python -m benchmarks.bench_extraction --settings mini,paper --paper-batch-sizes 1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from benchmarks import common
from benchmarks.common import Panel
from msvlad.config import ModelConfig
from msvlad.nn.backbones import build_backbone
from msvlad.nn.pooling import build_pooling

log = logging.getLogger(__name__)

NAME = "bench_extraction"
VARIANTS = ("backbone", "gem", "netvlad", "msvlad")
ASPECTS = ((4, 3), (3, 4), (1, 1), (16, 9), (3, 2), (2, 3))  # width:height of the generated photos
# multi-scale NetVLAD pooling time / backbone forward time to stay under, per setting
POOL_SHARE_GOAL = {"mini": 0.05, "paper": 0.02}
BASELINES: dict[str, str] = {
    "pool_share": "pooling time on the cached feature map / backbone forward time",
    "speed_vs_backbone": "backbone-only forward time / backbone+pooling forward time",
    "speedup_vs_peer": "seconds of max_side, batch 1, fewest workers / this one's",
}


def setting_config(setting: str, image_size: int | None = None) -> ModelConfig:
    """Model config of a profile (mini or paper), optionally at another image size."""
    return common.profile_params(setting, image_size).model


def build_poolings(cfg: ModelConfig, channels: int) -> dict[str, nn.Module]:
    """GeM, single-scale NetVLAD and the multi-scale pooled NetVLAD of a setting."""
    common = dict(
        num_clusters=cfg.num_clusters,
        pool_sizes=cfg.pool_sizes,
        split=cfg.split,
        alpha=cfg.alpha,
        gem_p=cfg.gem_p,
    )
    return {name: build_pooling(name, channels, **common) for name in ("gem", "netvlad", "msvlad")}


def _autocast(device: torch.device, amp: bool) -> Any:
    # the same autocast describe_images uses on CUDA (float16); none on CPU
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def bench_forward(
    setting: str,
    cfg: ModelConfig,
    batch_sizes: list[int],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    amp: bool,
) -> list[dict[str, Any]]:
    """One row per (batch size, variant): images/s, pooling share of the backbone, peak memory."""
    backbone = build_backbone(cfg.backbone, pretrained=False).to(device).eval()
    pools = {k: v.to(device).eval() for k, v in build_poolings(cfg, backbone.out_channels).items()}
    rows = []
    for bs in batch_sizes:
        x = torch.rand(bs, 3, cfg.image_size, cfg.image_size, device=device)
        with torch.inference_mode(), _autocast(device, amp):
            fmap = backbone(x)
            fns = {"backbone": lambda x=x: backbone(x)}
            for name, pool in pools.items():
                fns[f"pool:{name}"] = lambda p=pool, f=fmap: p(f)
                fns[f"full:{name}"] = lambda p=pool, x=x: p(backbone(x))
            t = common.time_interleaved(fns, repeats=repeats, warmup=warmup, device=device)
            t_backbone = t["backbone"].median
            with common.PeakMemory(device) as mem:
                backbone(x)
            rows.append(_row(setting, cfg, bs, "backbone", t_backbone, t_backbone, None, mem, fmap))
            rows[-1]["seconds_per_batch_min"] = t["backbone"].best
            for name, pool in pools.items():
                with common.PeakMemory(device) as mem_full:
                    desc = pool(backbone(x))
                row = _row(
                    setting,
                    cfg,
                    bs,
                    name,
                    t[f"full:{name}"].median,
                    t_backbone,
                    t[f"pool:{name}"].median,
                    mem_full,
                    fmap,
                )
                row["dim"] = int(desc.shape[1])
                row["seconds_per_batch_min"] = t[f"full:{name}"].best
                rows.append(row)
        log.info("%s batch %d done (feature map %s)", setting, bs, tuple(fmap.shape[1:]))
        del x, fmap
    return rows


def _row(
    setting: str,
    cfg: ModelConfig,
    bs: int,
    variant: str,
    t_full: float,
    t_backbone: float,
    t_pool: float | None,
    mem: common.PeakMemory,
    fmap: torch.Tensor,
) -> dict[str, Any]:
    return {
        "setting": setting,
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "batch": bs,
        "variant": variant,
        "dim": int(fmap.shape[1]),
        "fmap": "x".join(str(int(v)) for v in fmap.shape[1:]),
        "seconds_per_batch": t_full,
        "images_per_s": common.ratio(bs, t_full),
        "pool_seconds": t_pool,
        # cost of pooling as a fraction of the backbone forward (timed on the cached feature map)
        "pool_share": None if t_pool is None else common.ratio(t_pool, t_backbone),
        # throughput relative to the backbone alone (1.0 = pooling is free)
        "speed_vs_backbone": common.ratio(t_backbone, t_full),
        "peak_mib": mem.peak_mib,
    }


# ----------------------------------------------------------------------------- end to end


def make_jpegs(folder: Path, count: int, long_side: int, seed: int) -> list[Path]:
    """Smooth random colour photos of mixed aspect ratios (JPEG, quality 90)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        aw, ah = ASPECTS[i % len(ASPECTS)]
        scale = long_side / max(aw, ah)
        w, h = max(8, round(aw * scale)), max(8, round(ah * scale))
        coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def bench_end_to_end(
    cfg: ModelConfig,
    paths: list[Path],
    device: torch.device,
    *,
    batch_sizes: list[int],
    workers: list[int],
    repeats: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """describe_images: square vs max-side (bucketed) policy at each batch size and worker count;
    the baseline is the peer codes' habit, max-side at batch size 1 with the fewest workers."""
    from msvlad.evaluation.extract import ImageItem, describe_images
    from msvlad.nn.model import build_model

    model = (
        build_model(dataclasses.replace(cfg, pooling="msvlad"), pretrained=False).to(device).eval()
    )
    items = [ImageItem(p) for p in paths]
    batches = sorted({1, *batch_sizes})
    configs = [
        (policy, bs, nw) for nw in workers for policy in ("square", "max_side") for bs in batches
    ]

    def run(policy: str, bs: int, nw: int, subset: list) -> None:
        describe_images(
            model,
            subset,
            image_size=cfg.image_size,
            resize=policy,
            batch_size=bs,
            device=device,
            num_workers=nw,
            progress="bench",
        )

    # warm-up on a few images per configuration, then time the whole set round-robin
    for policy, bs, nw in configs:
        for _ in range(warmup):
            run(policy, bs, nw, items[: max(1, min(len(items), 2 * bs))])
    fns = {f"{p}/{b}/{w}": (lambda c=(p, b, w): run(*c, items)) for p, b, w in configs}
    timings = common.time_interleaved(fns, repeats=repeats, warmup=0, device=device)
    rows = []
    for policy, bs, nw in configs:
        t = timings[f"{policy}/{bs}/{nw}"]
        rows.append(
            {
                "policy": policy,
                "batch": bs,
                "workers": nw,
                "images": len(items),
                "seconds": t.median,
                "seconds_min": t.best,
                "images_per_s": common.ratio(len(items), t.median),
            }
        )
    base = next(
        r
        for r in rows
        if r["policy"] == "max_side" and r["batch"] == 1 and r["workers"] == min(workers)
    )
    for r in rows:
        r["speedup_vs_peer"] = common.ratio(base["seconds"], r["seconds"])
    return rows


# ----------------------------------------------------------------------------- summary and plot


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: largest pooling share of each pooling; does MS-NetVLAD meet the goal."""
    out: dict[str, Any] = {}
    for setting in sorted({r["setting"] for r in rows}):
        shares = {
            v: max(r["pool_share"] for r in rows if r["setting"] == setting and r["variant"] == v)
            for v in ("gem", "netvlad", "msvlad")
        }
        goal = POOL_SHARE_GOAL[setting]
        out[setting] = {
            "max_pool_share": shares,
            "msvlad_pool_share_below_goal": bool(shares["msvlad"] <= goal),
            "goal": goal,
        }
    return out


def figure(record: dict[str, Any]) -> Any:
    """Images/s and pooling share of the backbone against the batch size, per variant and
    setting; end to end, images/s and the speed-up over the peers' habit against the batch."""
    rows, e2e, b = record["forward"], record["end_to_end"], "batch size"
    pools = [r for r in rows if r["variant"] != "backbone"]
    line, e2e_line = "{setting} {variant}", "{policy} w{workers}"
    share = (b, "pooling / backbone forward, % (same run)", "pooling cost (dotted: goals)")
    panels = [
        (rows, Panel("batch", "images_per_s", line, (b, "images / s", "model forward"), 2, True)),
        (pools, Panel("batch", "pool_share", line, share, 2, True, scale=100)),
    ]
    if e2e:
        peer = (b, "speed / max_side batch 1 (same run)", "ratio to the peers' habit")
        panels += [
            (
                e2e,
                Panel("batch", "images_per_s", e2e_line, (b, "images / s", "describe_images"), 2),
            ),
            (e2e, Panel("batch", "speedup_vs_peer", e2e_line, peer, 2, reference=1)),
        ]
    fig = common.draw_panels(
        panels, "extraction: backbone + pooling (untrained networks, random inputs)"
    )
    for setting in sorted({r["setting"] for r in rows}):
        fig.axes[1].axhline(100 * POOL_SHARE_GOAL[setting], color="grey", ls=":", lw=1)
    return fig


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of this benchmark."""
    p = common.base_parser(NAME, __doc__.splitlines()[0])
    common.add_profile_options(p, None)
    p.add_argument("--batch-sizes", type=common.int_list, default=[1, 2, 4, 8, 16, 32])
    p.add_argument(
        "--paper-batch-sizes",
        type=common.int_list,
        default=None,
        help="batch sizes of the paper setting (default: --batch-sizes on CUDA, 1,2,4,8 on CPU)",
    )
    p.add_argument("--no-amp", action="store_true", help="no float16 autocast on CUDA")
    p.add_argument(
        "--e2e-images",
        type=int,
        default=64,
        help="generated JPEGs for the end-to-end part (0: skip)",
    )
    p.add_argument("--e2e-side", type=int, default=640, help="long side of the generated JPEGs")
    p.add_argument(
        "--e2e-batch-sizes",
        type=common.int_list,
        default=[2, 4, 8, 16],
        help="batch sizes of the end-to-end part (1, the peers' habit, is always added)",
    )
    p.add_argument(
        "--e2e-workers", type=common.count_list, default=[0, 2], help="DataLoader worker counts"
    )
    args = p.parse_args(argv)
    common.check_positive(p, args, "repeats", "e2e_side")
    return args


def measure(run: common.Run) -> dict[str, Any]:
    """The forward part of every setting, then the end-to-end part; the tables printed."""
    args, device = run.args, run.device
    settings = args.settings or (["mini", "paper"] if device.type == "cuda" else ["mini"])
    amp = not args.no_amp
    rows: list[dict[str, Any]] = []
    configs = {}
    for s in settings:
        cfg = setting_config(s, common.setting_size(args, s))
        configs[s] = dataclasses.asdict(cfg)
        sizes = args.batch_sizes
        if s == "paper":
            sizes = args.paper_batch_sizes or (
                args.batch_sizes if device.type == "cuda" else [1, 2, 4, 8]
            )
        rows += bench_forward(
            s, cfg, sizes, device, repeats=args.repeats, warmup=args.warmup, amp=amp
        )
    common.print_table(
        rows,
        "setting batch variant dim images_per_s speed_vs_backbone pool_share peak_mib",
        args,
        decimals={"images_per_s": 2, "speed_vs_backbone": 3, "pool_share": 4, "peak_mib": 1},
    )
    e2e: list[dict[str, Any]] = []
    if args.e2e_images > 0:
        cfg = setting_config("mini", args.mini_size)
        with tempfile.TemporaryDirectory(prefix="bench_jpegs_") as tmp:
            paths = make_jpegs(Path(tmp), args.e2e_images, args.e2e_side, args.seed)
            e2e = bench_end_to_end(
                cfg,
                paths,
                device,
                batch_sizes=args.e2e_batch_sizes,
                workers=args.e2e_workers,
                repeats=args.repeats,
                warmup=args.warmup,
            )
        common.print_table(
            e2e,
            "policy batch workers images images_per_s speedup_vs_peer",
            args,
            decimals={"images_per_s": 2, "speedup_vs_peer": 3},
        )
    return {
        "amp": amp and device.type == "cuda",
        "model_configs": configs,
        "forward": rows,
        "end_to_end": e2e,
        "summary": summarise(rows),
        "baselines": BASELINES,
    }


main = common.entry_point(NAME, parse_args, measure, figure)

if __name__ == "__main__":
    common.script(main)
