"""Fixed cost of a stage process: imports, network build, first image, for two code trees.

Every DVC stage is a new `python -m msvlad <command>` process, so what a stage pays before its
work (imports, building the network, the first image) is paid about fifty times by a full mini
run (a row's train stage runs the cluster, train and whiten commands' work in one process).
Each probe below runs in a fresh interpreter, for each code tree given by --lib (e.g. the code
before and after a change), timed round-robin (tree A, tree B, tree A, ...) so both see the same
machine load; the minimum and median of --repeats runs are kept and the ratio of the medians
(B / A) is what to read.

Probes:
  help        `python -m msvlad <stage> --help` (the CLI and the stage module's imports)
  imports-S   the modules stage S imports to run (its own and the lazy ones)
  model       load a model file (an EfficientNet-Lite0 MS-NetVLAD by default)
  first-image load the model and describe one image at the test-time input (max side 384)

    python -m benchmarks.stage_startup --lib /tmp/old/lib --lib lib --repeats 5 \\
        --model runs/msvlad-ots/init.pt --image data/mini/mini-test/jpg/graf_q0.jpg
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STAGES = ("prepare", "cluster", "train", "whiten", "evaluate", "report")
# what each stage imports to run, beyond its module (the lazy imports of its run path)
RUN_IMPORTS = {
    "prepare": ["msvlad.stages.prepare", "msvlad.mini.builder", "msvlad.mini.assets"],
    "cluster": ["msvlad.stages.cluster", "msvlad.nn.model", "msvlad.nn.kmeans"],
    "train": ["msvlad.stages.train", "msvlad.training.trainer"],
    "whiten": ["msvlad.stages.whiten", "msvlad.nn.model", "msvlad.evaluation.extract"],
    "evaluate": ["msvlad.stages.evaluate", "msvlad.nn.model"],
    "report": ["msvlad.stages.report", "papermill", "nbconvert"],
}


def probes(model: str | None, image: str | None) -> dict[str, list[str]]:
    """Probe name -> argv (run with the code tree first on PYTHONPATH)."""
    py = sys.executable
    out = {f"help-{s}": [py, "-m", "msvlad", s, "--help"] for s in STAGES}
    for stage, modules in RUN_IMPORTS.items():
        out[f"imports-{stage}"] = [py, "-c", "; ".join(f"import {m}" for m in modules)]
    if model:
        out["model"] = [py, "-c", f"from msvlad.nn.model import load_model; load_model({model!r})"]
        if image:
            code = (
                "import torch; from msvlad.nn.model import load_model; "
                "from msvlad.data.images import ImageItem, load_resized; "
                f"m = load_model({model!r}).eval(); "
                f"x = load_resized(ImageItem({image!r}), 384, 'max_side')[None]; "
                "torch.no_grad().__enter__(); m(x)"
            )
            out["first-image"] = [py, "-c", code]
    return out


def run_once(argv: Sequence[str], lib: Path) -> float:
    """Seconds of one fresh process running `argv` with `lib` first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(lib)}
    t0 = time.perf_counter()
    res = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} with {lib}: {res.stderr.strip()[-300:]}")
    return seconds


def measure(args: argparse.Namespace) -> dict[str, Any]:
    libs = [Path(p).resolve() for p in args.lib]
    table = probes(args.model, args.image)
    chosen = [p for p in table if not args.probes or any(p.startswith(q) for q in args.probes)]
    times: dict[str, dict[str, list[float]]] = {p: {str(lib): [] for lib in libs} for p in chosen}
    for lib in libs:  # one warm-up each: the page cache, __pycache__
        for p in chosen:
            run_once(table[p], lib)
    load_before = list(os.getloadavg())
    for _ in range(args.repeats):
        for p in chosen:
            for lib in libs:
                times[p][str(lib)].append(run_once(table[p], lib))
    rows = []
    for p in chosen:
        row: dict[str, Any] = {"probe": p}
        for i, lib in enumerate(libs):
            t = times[p][str(lib)]
            row[f"median_{i}"] = round(statistics.median(t), 3)
            row[f"min_{i}"] = round(min(t), 3)
        if len(libs) > 1:
            row["ratio"] = round(row["median_1"] / row["median_0"], 2)
        rows.append(row)
    return {
        "libs": [str(lib) for lib in libs],
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "rows": rows,
    }


def table(record: dict[str, Any]) -> str:
    libs = record["libs"]
    head = "| probe | " + " | ".join(f"tree {i} median (min)" for i in range(len(libs)))
    head += " | ratio 1/0 |" if len(libs) > 1 else " |"
    lines = [head, "|---" * (len(libs) + 1 + (len(libs) > 1)) + "|"]
    for r in record["rows"]:
        cells = [f"{r[f'median_{i}']:.2f} s ({r[f'min_{i}']:.2f})" for i in range(len(libs))]
        ratio = [f"{r['ratio']:.2f}"] if len(libs) > 1 else []
        lines.append("| " + " | ".join([r["probe"], *cells, *ratio]) + " |")
    load = f"load (1 min) {record['load_before'][0]:.1f} -> {record['load_after'][0]:.1f}"
    trees = "; ".join(f"tree {i}: {lib}" for i, lib in enumerate(libs))
    lines.append(f"\n{trees}; {record['cpu_count']} CPUs, threads {record['threads']}, {load}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.stage_startup", description=__doc__.splitlines()[0]
    )
    p.add_argument("--lib", action="append", required=True, help="A code tree's lib/ folder.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", help="Model file for the model and first-image probes.")
    p.add_argument("--image", help="Image for the first-image probe.")
    p.add_argument("--probes", nargs="*", help="Only the probes starting with these names.")
    p.add_argument("--json", type=Path, help="Also write the record as JSON here.")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    record = measure(args)
    print(table(record))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
