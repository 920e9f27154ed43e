"""Extraction speed and peak memory: backbone alone vs + GeM, + NetVLAD, + multi-scale NetVLAD.

Part 1 (model forward on synthetic tensors): for each setting (mini: EfficientNet-Lite0 at 224 from
params.yaml; paper: ResNet-101 at 512, K=64, split 512 from params.paper.yaml) and batch size, times
(a) the backbone alone, (b) + GeM, (c) + single-scale NetVLAD, (d) + the paper's multi-scale pooled
NetVLAD. The pooling cost is timed separately on the cached feature map and reported as a ratio
to the backbone forward (goal of the paper's design: multi-scale NetVLAD < 10% of the backbone).
Networks are untrained (random weights): speed does not depend on the weight values.

Part 2 (end to end, `msvlad.evaluation.extract.embed_images`): generated JPEGs of mixed aspect
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

from benchmarks.common import (
    PeakMemory,
    base_parser,
    check_positive,
    format_table,
    int_list,
    new_figure,
    plot_path,
    ratio,
    report,
    save_figure,
    setup_run,
    str_list,
    time_interleaved,
    write_results,
)
from msvlad.config import ModelConfig, load_params
from msvlad.nn.backbones import build_backbone
from msvlad.nn.pooling import build_pooling
from msvlad.paths import ROOT

log = logging.getLogger(__name__)

NAME = "bench_extraction"
SETTINGS = {"mini": "params.yaml", "paper": "params.paper.yaml"}
VARIANTS = ("backbone", "gem", "netvlad", "msvlad")
ASPECTS = ((4, 3), (3, 4), (1, 1), (16, 9), (3, 2), (2, 3))  # width:height of the generated photos
POOL_SHARE_GOAL = 0.10


def setting_config(setting: str, image_size: int | None = None) -> ModelConfig:
    """Model config of a profile (mini or paper), optionally at another image size."""
    if setting not in SETTINGS:
        raise ValueError(f"--settings: unknown setting {setting!r}; choose from {sorted(SETTINGS)}")
    cfg = load_params(ROOT / SETTINGS[setting]).model
    return dataclasses.replace(cfg, image_size=image_size) if image_size else cfg


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
    # the same autocast embed_images uses on CUDA (float16); none on CPU
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
            t = time_interleaved(fns, repeats=repeats, warmup=warmup, device=device)
            t_backbone = t["backbone"].median
            with PeakMemory(device) as mem:
                backbone(x)
            rows.append(_row(setting, cfg, bs, "backbone", t_backbone, t_backbone, None, mem, fmap))
            for name, pool in pools.items():
                with PeakMemory(device) as mem_full:
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
    mem: PeakMemory,
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
        "images_per_s": ratio(bs, t_full),
        "pool_seconds": t_pool,
        # cost of pooling as a fraction of the backbone forward (timed on the cached feature map)
        "pool_share": None if t_pool is None else ratio(t_pool, t_backbone),
        # throughput relative to the backbone alone (1.0 = pooling is free)
        "speed_vs_backbone": ratio(t_backbone, t_full),
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
    batch_size: int,
    workers: list[int],
    repeats: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """embed_images: square vs max-side (bucketed) vs max-side batch 1, per worker count."""
    from msvlad.evaluation.extract import ImageItem, embed_images
    from msvlad.nn.model import build_model

    model = (
        build_model(dataclasses.replace(cfg, pooling="msvlad"), pretrained=False).to(device).eval()
    )
    items = [ImageItem(p) for p in paths]
    modes = [("square", batch_size), ("max_side", batch_size), ("max_side", 1)]
    configs = [(policy, bs, nw) for nw in workers for policy, bs in modes]

    def run(policy: str, bs: int, nw: int, subset: list) -> None:
        embed_images(
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
    timings = time_interleaved(fns, repeats=repeats, warmup=0, device=device)
    rows = []
    for policy, bs, nw in configs:
        seconds = timings[f"{policy}/{bs}/{nw}"].median
        rows.append(
            {
                "policy": policy,
                "batch": bs,
                "workers": nw,
                "images": len(items),
                "seconds": seconds,
                "images_per_s": ratio(len(items), seconds),
            }
        )
    base = next(
        r
        for r in rows
        if r["policy"] == "max_side" and r["batch"] == 1 and r["workers"] == min(workers)
    )
    for r in rows:
        r["speedup_vs_peer"] = ratio(base["seconds"], r["seconds"])
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
        out[setting] = {
            "max_pool_share": shares,
            "msvlad_pool_share_below_goal": bool(shares["msvlad"] < POOL_SHARE_GOAL),
            "goal": POOL_SHARE_GOAL,
        }
    return out


def plot(rows: list[dict[str, Any]], e2e: list[dict[str, Any]], path: Path) -> Path:
    """Images/s vs batch size per variant and setting, pooling share, end-to-end speed-ups."""
    settings = sorted({r["setting"] for r in rows})
    ncols = len(settings) + 1 + (1 if e2e else 0)
    fig, axes = new_figure(ncols=ncols)
    for ax, setting in zip(axes[0], settings, strict=False):
        for v in VARIANTS:
            sel = [r for r in rows if r["setting"] == setting and r["variant"] == v]
            ax.plot(
                [r["batch"] for r in sel], [r["images_per_s"] for r in sel], marker="o", label=v
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(f"{setting}: {sel[0]['backbone']} @ {sel[0]['image_size']}")
        ax.legend(fontsize=8)
    ax = axes[0][len(settings)]
    for setting in settings:
        for v in ("gem", "netvlad", "msvlad"):
            sel = [r for r in rows if r["setting"] == setting and r["variant"] == v]
            ax.plot(
                [r["batch"] for r in sel],
                [100 * r["pool_share"] for r in sel],
                marker="o",
                label=f"{setting} {v}",
            )
    ax.axhline(100 * POOL_SHARE_GOAL, color="grey", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("pooling time, % of backbone")
    ax.set_title("pooling cost")
    ax.legend(fontsize=7)
    if e2e:
        ax = axes[0][-1]
        labels = [f"{r['policy']}\nbs{r['batch']} w{r['workers']}" for r in e2e]
        ax.bar(range(len(e2e)), [r["speedup_vs_peer"] for r in e2e])
        ax.set_xticks(range(len(e2e)), labels, fontsize=7)
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_ylabel("speed vs max_side bs1 w0")
        ax.set_title("embed_images end to end")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Command-line options of this benchmark."""
    p = base_parser(NAME, __doc__.splitlines()[0])
    p.add_argument(
        "--settings",
        type=str_list,
        default=None,
        help="mini and/or paper (default: mini on CPU, mini,paper on CUDA)",
    )
    p.add_argument("--batch-sizes", type=int_list, default=[1, 2, 4, 8, 16, 32])
    p.add_argument(
        "--paper-batch-sizes",
        type=int_list,
        default=None,
        help="batch sizes of the paper setting (default: --batch-sizes on CUDA, 1,2 on CPU)",
    )
    p.add_argument("--mini-size", type=int, default=None, help="override the mini image size (224)")
    p.add_argument(
        "--paper-size", type=int, default=None, help="override the paper image size (512)"
    )
    p.add_argument("--no-amp", action="store_true", help="no float16 autocast on CUDA")
    p.add_argument(
        "--e2e-images",
        type=int,
        default=64,
        help="generated JPEGs for the end-to-end part (0: skip)",
    )
    p.add_argument("--e2e-side", type=int, default=640, help="long side of the generated JPEGs")
    p.add_argument("--e2e-batch", type=int, default=16, help="batch size of the batched policies")
    p.add_argument(
        "--e2e-workers", type=int_list_or_zero, default=[0, 2], help="DataLoader worker counts"
    )
    args = p.parse_args(argv)
    check_positive(p, args, "repeats", "e2e_side", "e2e_batch")
    return args, p


def int_list_or_zero(text: str) -> list[int]:
    """argparse type: "0,2" -> [0, 2] (non-negative integers)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the extraction benchmark; print the tables, write JSON + PNG, return the record."""
    args, parser = parse_args(argv)
    device = setup_run(args)
    settings = args.settings or (["mini", "paper"] if device.type == "cuda" else ["mini"])
    for s in settings:
        if s not in SETTINGS:
            parser.error(f"--settings: unknown setting {s!r}; choose from {sorted(SETTINGS)}")
    amp = not args.no_amp
    rows: list[dict[str, Any]] = []
    configs = {}
    for s in settings:
        size = args.mini_size if s == "mini" else args.paper_size
        cfg = setting_config(s, size)
        configs[s] = dataclasses.asdict(cfg)
        sizes = args.batch_sizes
        if s == "paper":
            sizes = args.paper_batch_sizes or (
                args.batch_sizes if device.type == "cuda" else [1, 2]
            )
        rows += bench_forward(
            s, cfg, sizes, device, repeats=args.repeats, warmup=args.warmup, amp=amp
        )
    columns = [
        "setting",
        "batch",
        "variant",
        "dim",
        "images_per_s",
        "speed_vs_backbone",
        "pool_share",
        "peak_mib",
    ]
    report(format_table(rows, columns), args)

    e2e: list[dict[str, Any]] = []
    if args.e2e_images > 0:
        cfg = setting_config("mini", args.mini_size)
        with tempfile.TemporaryDirectory(prefix="bench_jpegs_") as tmp:
            paths = make_jpegs(Path(tmp), args.e2e_images, args.e2e_side, args.seed)
            e2e = bench_end_to_end(
                cfg,
                paths,
                device,
                batch_size=args.e2e_batch,
                workers=args.e2e_workers,
                repeats=args.repeats,
                warmup=args.warmup,
            )
        report(
            "\n"
            + format_table(
                e2e, ["policy", "batch", "workers", "images", "images_per_s", "speedup_vs_peer"]
            ),
            args,
        )

    summary = summarise(rows)
    record = write_results(
        args.out,
        NAME,
        args,
        device,
        {
            "amp": amp and device.type == "cuda",
            "model_configs": configs,
            "forward": rows,
            "end_to_end": e2e,
            "summary": summary,
            "baselines": {
                "pool_share": "pooling time on the cached feature map / backbone forward time",
                "speed_vs_backbone": "backbone-only forward time / backbone+pooling forward time",
                "speedup_vs_peer": "seconds of max_side, batch 1, fewest workers / this one's",
            },
        },
    )
    plot(rows, e2e, plot_path(args.out))
    return record


if __name__ == "__main__":
    from msvlad.runtime import setup_logging

    setup_logging()
    main()
