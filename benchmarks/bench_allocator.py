"""CPU forward time with glibc's default allocator, then with `runtime.tune_allocator` applied.

Every `python -m msvlad` command calls `msvlad.runtime.tune_allocator()` first: glibc's malloc
then keeps freed blocks in its heap instead of returning every large one to the kernel, so the
activation maps of the next batch reuse memory instead of being faulted in and zeroed again.
This script measures what that buys, in one process: each workload is timed with the default
allocator (the baseline), then the allocator is tuned (a one-way switch) and the same workload,
on the same tensors, is timed again. It records seconds (min and median of the repeats), the
ratio tuned / default, the page faults per call, and whether the outputs are bit-identical
(allocation never changes arithmetic; the check says so for these inputs).

Workloads (EfficientNet-Lite0, random weights, eval, no grad, channels-last as built):
  trunk-224   the frozen trunk (stem + 6 blocks) on a batch of 32 at 224 x 224: what training's
              frozen-trunk cache computes for every training image
  full-384    the whole backbone on one 384 x 288 image: one test-time extraction

    python -m benchmarks.bench_allocator --repeats 5
"""

from __future__ import annotations

import argparse
import resource
from typing import Any

import torch

from benchmarks import common
from benchmarks.common import Timing, ratio, time_call
from msvlad.nn.backbones import build_backbone
from msvlad.runtime import tune_allocator

NAME = "bench_allocator"
# workload: (input shape, backbone stages run; None: the whole backbone)
WORKLOADS: dict[str, tuple[tuple[int, ...], int | None]] = {
    "trunk-224": ((32, 3, 224, 224), 7),
    "full-384": ((1, 3, 384, 288), None),
}


def _faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_workloads(
    names: list[str], repeats: int, warmup: int, seed: int
) -> dict[str, tuple[Timing, float, torch.Tensor]]:
    """Seconds, page faults per call and the last output of each workload, as allocated now."""
    torch.manual_seed(seed)
    backbone = build_backbone("efficientnet_lite0", pretrained=False).eval()
    out: dict[str, tuple[Timing, float, torch.Tensor]] = {}
    for name in names:
        shape, stop = WORKLOADS[name]
        images = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        images = images.contiguous(memory_format=torch.channels_last)

        def call(images: torch.Tensor = images, stop: int | None = stop) -> torch.Tensor:
            with torch.inference_mode():
                return backbone(images) if stop is None else backbone.trunk(images, stop)

        before = _faults()
        timing = time_call(call, repeats=repeats, warmup=warmup)
        faults = (_faults() - before) / (repeats + warmup)
        out[name] = (timing, faults, call())
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--workloads", type=common.str_list, default=list(WORKLOADS))
    parser.set_defaults(repeats=5, device="cpu")
    args = parser.parse_args(argv)
    common.check_choices(parser, "--workloads", args.workloads, list(WORKLOADS))
    common.check_positive(parser, args, "repeats")
    return args


def measure(run: common.Run) -> dict[str, Any]:
    """Every workload with the default allocator, then tuned; the table of ratios."""
    args = run.args
    default = time_workloads(args.workloads, args.repeats, args.warmup, args.seed)
    applied = tune_allocator()
    tuned = time_workloads(args.workloads, args.repeats, args.warmup, args.seed)
    rows = []
    for name in args.workloads:
        (t0, f0, y0), (t1, f1, y1) = default[name], tuned[name]
        rows.append(
            {
                "workload": name,
                "default_s": t0.to_json(),
                "tuned_s": t1.to_json(),
                "ratio_median": ratio(t1.median, t0.median),
                "ratio_min": ratio(t1.best, t0.best),
                "faults_default": f0,
                "faults_tuned": f1,
                "identical": bool(torch.equal(y0, y1)),
            }
        )
    common.print_table(rows, TABLE, args, decimals=3)
    return {"applied": applied, "rows": rows}


TABLE = "workload ratio_median ratio_min faults_default faults_tuned identical"


def figure(record: dict[str, Any]) -> Any:
    """Median seconds per call, default against tuned allocator, per workload."""
    fig, axes = common.new_figure(size=(5.5, 3.8))
    ax = axes[0][0]
    rows = record["rows"]
    x = range(len(rows))
    for shift, key, label in ((-0.2, "default_s", "glibc default"), (0.2, "tuned_s", "tuned")):
        ax.bar([i + shift for i in x], [r[key]["median_s"] for r in rows], 0.4, label=label)
    ax.set_xticks(list(x), [f"{r['workload']}\n×{r['ratio_median']:.2f}" for r in rows])
    common.style_axes(
        ax, xlabel="workload (tuned / default)", ylabel="seconds per call", title="allocator"
    )
    fig.suptitle("CPU forward with glibc's default allocator and tuned (median)", fontsize=10)
    return fig


main = common.entry_point(NAME, parse_args, measure, figure)

if __name__ == "__main__":
    common.script(main)
