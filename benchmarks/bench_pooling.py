"""Multi-scale NetVLAD pooling time as a share of the backbone forward, fused against unfused.

Per setting (the paper's ResNet-101 at 512 px, split 512, K 64; the mini profile's
EfficientNet-Lite0 at 224 px, split 160, K 32; both with 2 x 2 and 3 x 3 regions) and batch size,
timed round-robin in one process (eval, no grad, random weights and images, channels-last maps as
the backbones give them):

- backbone: the conv trunk's forward (the baseline of the ratios);
- fused: `msvlad.nn.functional.multiscale_netvlad` on the cached feature map (what
  `NetVLAD.forward` runs): chained 2 x 2 max-pools, normalisation folded into the matmuls;
- unfused: `netvlad(multiscale_local_features(...))`, the path before: 3 x 3 max-pool, the bag
  L2-normalised into a new tensor (cast again under autocast), then NetVLAD.
Pooling calls are repeated `--inner` times per timed repeat (per-call seconds are reported).

The ratio is pooling / backbone for the minimum and the median of the repeats. Goals: <= 2 % on
the paper setting, <= 5 % on the mini one.

    python -m benchmarks.bench_pooling --settings paper,mini --batch-sizes 1,4 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from benchmarks import common
from benchmarks.common import Timing, ratio, time_interleaved
from msvlad.nn import functional as LF
from msvlad.nn.backbones import build_backbone
from msvlad.nn.pooling import NetVLAD

log = logging.getLogger(__name__)

NAME = "bench_pooling"
# backbone, image size, split, clusters (pool sizes (2, 3) in both)
SETTINGS: dict[str, tuple[str, int, int, int]] = {
    "paper": ("resnet101", 512, 512, 64),
    "mini": ("efficientnet_lite0", 224, 160, 32),
}
GOALS = {"paper": 0.02, "mini": 0.05}


def bench_setting(
    setting: str,
    batch: int,
    *,
    repeats: int = 5,
    warmup: int = 1,
    inner: int = 20,
    device: torch.device | None = None,
    image_size: int | None = None,
    amp: bool = False,
    backbone: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Median and minimum seconds of backbone, fused and unfused pooling; their ratios.

    `amp`: everything under bf16 autocast (CUDA), the feature map included; `backbone`: the
    setting's backbone already built (random weights otherwise).
    """
    device = device or torch.device("cpu")
    amp = amp and device.type == "cuda"

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    name, size, split, k = SETTINGS[setting]
    size = image_size or size
    backbone = (backbone or build_backbone(name, pretrained=False)).eval().to(device)
    images = torch.rand(batch, 3, size, size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast():
        fmap = backbone(images)
    pool = NetVLAD(fmap.shape[1], k, (2, 3), split).eval().to(device)
    c, w, b = pool.centroids, pool.weight, pool.bias

    def unfused() -> torch.Tensor:
        return LF.netvlad(LF.multiscale_local_features(fmap, (2, 3), split), c, w, b)

    def repeated(fn: Any) -> Any:
        return lambda: [fn() for _ in range(inner)]

    def run_backbone() -> torch.Tensor:
        return backbone(images)

    calls = {
        "backbone": run_backbone,
        "fused": repeated(lambda: pool(fmap)),
        "unfused": repeated(unfused),
    }
    with torch.no_grad(), autocast():
        gap = float((pool(fmap).float() - unfused().float()).abs().max())
        t = time_interleaved(calls, repeats=repeats, warmup=warmup, device=device)
    for m in ("fused", "unfused"):  # seconds per call
        t[m] = Timing(tuple(v / inner for v in t[m].times))
    row: dict[str, Any] = {
        "setting": setting,
        "backbone": name,
        "image_size": size,
        "batch": batch,
        "amp_bf16": amp,
        "fmap": list(fmap.shape[1:]),
        "max_abs_diff": gap,
        "pool_calls_per_repeat": inner,  # sub-millisecond calls are timed several at a time
        **{f"{m}_s": t[m].to_json() for m in calls},
    }
    for m in ("fused", "unfused"):
        row[f"{m}_share_min"] = ratio(t[m].best, t["backbone"].best)
        row[f"{m}_share_median"] = ratio(t[m].median, t["backbone"].median)
    row["goal"] = GOALS[setting]
    row["fused_meets_goal"] = row["fused_share_median"] <= GOALS[setting]
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=common.str_list, default=["paper", "mini"])
    parser.add_argument("--batch-sizes", type=common.int_list, default=[1, 2, 4, 8])
    parser.add_argument("--inner", type=int, default=20, help="pooling calls per timed repeat")
    parser.set_defaults(threads=1, repeats=5)  # one thread: steady timings on a shared machine
    args = parser.parse_args(argv)
    common.check_choices(parser, "--settings", args.settings, list(SETTINGS))
    common.check_positive(parser, args, "repeats", "inner")
    return args


def measure(run: common.Run) -> dict[str, Any]:
    """Every setting and batch size; the table of shares."""
    args = run.args
    opts = {"repeats": args.repeats, "warmup": args.warmup, "inner": args.inner}
    rows = [
        bench_setting(s, b, device=run.device, **opts)
        for s in args.settings
        for b in args.batch_sizes
    ]
    for r in rows:
        r["fused_vs_unfused"] = common.ratio(r["fused_s"]["median_s"], r["unfused_s"]["median_s"])
    common.print_table(rows, TABLE, args, decimals=4)
    return {"rows": rows}


TABLE = (
    "setting batch fused_share_median fused_share_min unfused_share_median unfused_share_min "
    "fused_vs_unfused goal fused_meets_goal"
)


def figure(record: dict[str, Any]) -> Any:
    """Pooling / backbone forward against the batch (fused and unfused); fused / unfused."""
    points = [
        {"setting": r["setting"], "batch": r["batch"], "path": m, "share": r[f"{m}_share_median"]}
        for r in record["rows"]
        for m in ("fused", "unfused")
    ]
    return common.draw_panels(
        [
            (
                points,
                common.Panel(
                    "batch",
                    "share",
                    "{setting} {path}",
                    ("batch", "pooling / backbone", "share of the forward"),
                    xlog=2,
                    reference=0.02,
                ),
            ),
            (
                record["rows"],
                common.Panel(
                    "batch",
                    "fused_vs_unfused",
                    "{setting}",
                    ("batch", "time ratio", "fused / unfused pooling"),
                    xlog=2,
                    reference=1.0,
                ),
            ),
        ],
        "multi-scale NetVLAD pooling against the backbone forward (median of repeats)",
    )


main = common.entry_point(NAME, parse_args, measure, figure)

if __name__ == "__main__":
    common.script(main)
