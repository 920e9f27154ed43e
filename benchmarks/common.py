"""What every benchmark script shares: options, the machine, timing, memory, tables, JSON and PNG.

House rule: speed and memory are reported as RATIOS against a baseline measured in the same process
(same machine, threads and inputs); absolute seconds are recorded for context, never asserted.
Timings are repeated: the median and the minimum (the least disturbed run) are both recorded.
The machine is recorded with every result (CPU model, cores, load average before and after the
run, memory, torch / numpy / faiss versions and threads, the GPU if any) and named on every figure,
so a number taken on a loaded machine says so.

A script defines `parse_args(argv)`, `measure(run)` (times, prints its tables with `print_table`,
returns the results) and `figure(record)` (a matplotlib Figure, usually `draw_panels` of `Panel`s);
`main = entry_point(NAME, parse_args, measure, figure)` then writes `<out>.json` and the figure,
with the machine named under it, as `<out>.png`. `--replot` redraws the PNG from an existing JSON
without measuring again.

Run a benchmark from the repository root as a module, e.g. `python -m benchmarks.bench_search`.

Peak memory (see `PeakMemory`):
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the bytes allocated
  when the block started: the peak of tensors the block created (the caching allocator's spare
  blocks are not counted).
- CPU (Linux): the kernel's resident-set high-water mark. After `gc.collect()` and glibc
  `malloc_trim(0)`, writing "5" to /proc/self/clear_refs resets VmHWM to the current VmRSS; the
  peak is VmHWM at the end minus VmRSS at the start. It covers every allocator of the process
  (torch, numpy, faiss, PIL) but not DataLoader worker processes. Where /proc is not writable the
  fallback is the `resource.getrusage(RUSAGE_SELF).ru_maxrss` increase, which is 0 unless the
  block sets a new process-wide high (the method name says which was used).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from msvlad.config import Params, load_params
from msvlad.paths import BENCH, ROOT
from msvlad.runtime import resolve_device
from msvlad.storage import read_json, write_json

RESULTS_DIR = BENCH
MIB = 1024.0 * 1024.0
# the two parameter profiles, by the name the scripts' --settings use
PROFILES: dict[str, str] = {"mini": "params.yaml", "paper": "params.paper.yaml"}

FigureBuilder = Callable[[Mapping[str, Any]], Figure]
Measure = Callable[["Run"], Mapping[str, Any]]


# ----------------------------------------------------------------------------- arguments


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Parser with the options every benchmark shares (--out, --device, --repeats, ...)."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help="JSON result file; the figure is written next to it with a .png suffix",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available, else CPU",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median and min)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="JSON",
        help="only redraw the figure of an existing result file (written beside it)",
    )
    return parser


def _int_list(text: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """argparse type: "1,2,4" -> [1, 2, 4] (positive integers)."""
    return _int_list(text, 1)


def count_list(text: str) -> list[int]:
    """argparse type: "0,2" -> [0, 2] (non-negative integers, e.g. worker counts)."""
    return _int_list(text, 0)


def str_list(text: str) -> list[str]:
    """argparse type: "a,b" -> ["a", "b"]."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exit with a one-line usage error when one of the named integer options is < 1."""
    for name in names:
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag}: expected a positive integer, got {getattr(args, name)}")


def check_choices(
    parser: argparse.ArgumentParser, option: str, values: Sequence[str], allowed: Sequence[str]
) -> None:
    """Exit with a one-line usage error naming the option when a value is not allowed."""
    bad = [v for v in values if v not in allowed]
    if bad:
        parser.error(f"{option}: unknown {bad}; choose from {list(allowed)}")


def add_profile_options(parser: argparse.ArgumentParser, settings: list[str] | None) -> None:
    """--settings (mini and/or paper) and the image-size overrides of each profile."""
    parser.add_argument(
        "--settings",
        type=str_list,
        default=settings,
        help=f"mini and/or paper (default: {','.join(settings) if settings else 'by device'})",
    )
    for name, size in (("mini", 224), ("paper", 512)):
        parser.add_argument(
            f"--{name}-size",
            type=int,
            default=None,
            help=f"override the {name} image size ({size})",
        )


def setting_size(args: argparse.Namespace, setting: str) -> int | None:
    """The --mini-size / --paper-size override of a setting (None: the profile's)."""
    return getattr(args, f"{setting}_size")


def profile_params(setting: str, image_size: int | None = None) -> Params:
    """Params of a profile (mini: params.yaml, paper: params.paper.yaml), optionally resized."""
    if setting not in PROFILES:
        raise ValueError(f"--settings: unknown setting {setting!r}; choose from {sorted(PROFILES)}")
    params = load_params(ROOT / PROFILES[setting])
    if image_size:
        model = dataclasses.replace(params.model, image_size=image_size)
        params = dataclasses.replace(params, model=model)
    return params


# ----------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable processes), None where unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _meminfo_gib(key: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 2**20, 2)
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_name(device: torch.device) -> str:
    """Human-readable name of the device that ran the benchmark."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Machine and library facts recorded in every result file (the load is sampled now)."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": load_average(),
        "memory_total_gib": _meminfo_gib("MemTotal"),
        "memory_available_gib": _meminfo_gib("MemAvailable"),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda_version"] = torch.version.cuda
        info["cudnn_version"] = torch.backends.cudnn.version()
    try:
        import faiss

        info["faiss_version"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    return info


def machine_caption(env: Mapping[str, Any]) -> str:
    """One line naming the machine of a result: device, cores, load before -> after, versions."""
    parts = [str(env.get("device_name") or env.get("cpu_model") or "unknown machine")]
    if env.get("device", "cpu").startswith("cuda") and env.get("cpu_model"):
        parts.append(f"host {env['cpu_model']}")
    parts.append(f"{env.get('cpus_usable') or env.get('cpu_count')} CPU cores")
    before, after = env.get("load_before"), env.get("load_after")
    if before and after:
        parts.append(f"load (1 min) {before[0]:.1f} -> {after[0]:.1f}")
    else:
        parts.append("load not recorded")
    parts.append(f"torch {env.get('torch_version', '?')}")
    if env.get("faiss_version"):
        parts.append(f"faiss {env['faiss_version']}")
    return " · ".join(parts)


# ----------------------------------------------------------------------------- a run


@dataclass
class Run:
    """A started benchmark: its arguments, device and the machine's load when it began."""

    name: str
    args: argparse.Namespace
    device: torch.device
    load_before: list[float] | None
    started: float


def start_run(name: str, args: argparse.Namespace) -> Run:
    """Apply --threads and --seed, resolve --device, and note the load average before measuring."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    return Run(name, args, resolve_device(args.device), load_average(), time.time())


def finish_run(run: Run, results: Mapping[str, Any], figure: FigureBuilder) -> dict[str, Any]:
    """Write the record (benchmark, arguments, machine with load before/after, results) as JSON,
    then its figure as PNG beside it; return the record."""
    env = machine_info(run.device)
    env.update(load_before=run.load_before, load_after=env.pop("load_average"))
    record = {
        "benchmark": run.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": time.time() - run.started,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.args).items()},
        "environment": env,
        "memory_method": memory_method(run.device),
        **results,
    }
    record = json_safe(record)
    write_json(run.args.out, record)
    save_png(figure(record), record, run.args.out)
    return record


def entry_point(
    name: str,
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    measure: Measure,
    figure: FigureBuilder,
) -> Callable[[list[str] | None], dict[str, Any]]:
    """A script's `main(argv)`: parse, then run_benchmark; returns the record."""

    def main(argv: list[str] | None = None) -> dict[str, Any]:
        return run_benchmark(name, parse_args(argv), measure, figure)

    main.__doc__ = f"Run {name}: print the tables, write JSON + PNG, return the record."
    return main


def script(main: Callable[[], Any]) -> None:
    """Run a benchmark's main from the command line, logging to stderr."""
    from msvlad.runtime import setup_logging

    setup_logging()
    main()


def run_benchmark(
    name: str, args: argparse.Namespace, measure: Measure, figure: FigureBuilder
) -> dict[str, Any]:
    """The body of every script's main: --replot redraws; else start, measure, write."""
    if args.replot:
        return replot(args.replot, figure)
    if getattr(args, "settings", None):
        bad = [s for s in args.settings if s not in PROFILES]
        if bad:
            raise SystemExit(f"--settings: unknown {bad}; choose from {sorted(PROFILES)}")
    run = start_run(name, args)
    return finish_run(run, measure(run), figure)


def replot(path: Path, figure: FigureBuilder) -> dict[str, Any]:
    """Redraw the PNG of an existing result file (after a change of the figure); return it."""
    record = read_json(path)
    save_png(figure(record), record, path)
    return record


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device | None) -> None:
    """Wait for queued CUDA work so wall-clock timings cover it (no-op on CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs of one call."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median seconds (the figure the tables report)."""
        return float(statistics.median(self.times))

    @property
    def best(self) -> float:
        """Fastest run in seconds (the least disturbed by other processes)."""
        return float(min(self.times))

    def to_json(self) -> dict[str, Any]:
        """Median, best and every run, in seconds."""
        return {"median_s": self.median, "best_s": self.best, "runs_s": list(self.times)}


def time_call(
    fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, device: torch.device | None = None
) -> Timing:
    """Run fn `warmup` times untimed, then time `repeats` runs (CUDA synchronised around each)."""
    return time_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, device=device)["fn"]


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 3,
    warmup: int = 1,
    device: torch.device | None = None,
) -> dict[str, Timing]:
    """Time several calls round-robin (A, B, C, A, B, C, ...) so load drift on a shared machine
    affects every call alike and their ratios stay fair; warm-up runs each call `warmup` times."""
    if repeats < 1:
        raise ValueError(f"repeats: expected a positive integer, got {repeats}")
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(t)) for name, t in times.items()}


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is not a positive finite number."""
    if not (math.isfinite(denominator) and denominator > 0 and math.isfinite(numerator)):
        return float("nan")
    return numerator / denominator


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class PeakMemory:
    """Context manager measuring the peak extra memory of a block (method recorded in `.method`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.peak_bytes = 0
        self._start = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        _malloc_trim()
        rss = _proc_status_kib("VmRSS")
        if rss is not None and _reset_hwm():
            self._start = rss * 1024
            self.method = "cpu_vmhwm_delta"
        else:
            self._start = _maxrss_bytes()
            self.method = "cpu_ru_maxrss_delta"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            end = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "cpu_vmhwm_delta":
            end = (_proc_status_kib("VmHWM") or 0) * 1024
        else:
            end = _maxrss_bytes()
        self.peak_bytes = max(0, end - self._start)

    @property
    def peak_mib(self) -> float:
        """Peak extra memory in MiB."""
        return self.peak_bytes / MIB


def memory_method(device: torch.device) -> str:
    """Which peak-memory method `PeakMemory` uses on this device (for the result file)."""
    with PeakMemory(device) as probe:
        pass
    return probe.method


# ----------------------------------------------------------------------------- tables


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | str,
    args: argparse.Namespace,
    *,
    headers: Mapping[str, str] | None = None,
    decimals: int | Mapping[str, int] = 3,
) -> str:
    """Print rows as a markdown table (the library's one formatter) unless --quiet; return it.

    columns: names, or one string of space-separated names."""
    import pandas as pd

    from msvlad.report.tables import to_markdown

    columns = columns.split() if isinstance(columns, str) else list(columns)
    frame = pd.DataFrame([{c: row.get(c) for c in columns} for row in rows], columns=columns)
    headers = dict(headers or {})
    if isinstance(decimals, Mapping):
        decimals = {headers.get(c, c): d for c, d in decimals.items()}
    text = to_markdown(frame.rename(columns=headers), decimals=decimals)
    if not getattr(args, "quiet", False):
        print(text, flush=True)
    return text


# ----------------------------------------------------------------------------- figures


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 3.8)) -> Any:
    """A matplotlib Figure (no pyplot state) and its (nrows, ncols) axes array."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows + 0.4), layout="constrained")
    return fig, np.asarray(fig.subplots(nrows, ncols, squeeze=False))


def style_axes(
    ax: Axes,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    xlog: bool | int = False,
    ylog: bool = False,
    reference: float | None = None,
) -> None:
    """Labels, title, legend and log scales of one panel; `reference` draws a dashed level
    (1.0 on a ratio panel: the baseline)."""
    if xlog:
        ax.set_xscale("log", base=2 if xlog == 2 else 10)
    if ylog:
        ax.set_yscale("log")
    if reference is not None:
        ax.axhline(reference, color="grey", ls="--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


class Panel(NamedTuple):
    """One panel of a figure: y against x, one line per `line` label (a format string over a
    row, e.g. "{method} {sweep}"), with its axis labels, title and scales."""

    x: str
    y: str
    line: str
    labels: tuple[str, str, str]  # x label, y label, title
    xlog: bool | int = False  # 2: log base 2
    ylog: bool = False
    reference: float | None = None  # a dashed level (1.0 on a ratio panel: the baseline)
    scale: float = 1.0
    order: str | None = None  # join points in the order of this key (default: x)


def draw_panels(panels: Sequence[tuple[Sequence[Mapping[str, Any]], Panel]], title: str) -> Figure:
    """A figure of (rows, Panel) pairs side by side, under a title."""
    fig, axes = new_figure(ncols=len(panels), size=(4.6, 3.8))
    fig.suptitle(title, fontsize=10)
    for ax, (rows, panel) in zip(axes[0], panels, strict=True):
        plot_lines(
            ax,
            rows,
            panel.x,
            panel.y,
            lambda r, fmt=panel.line: fmt.format(**r),
            scale=panel.scale,
            order=panel.order,
        )
        xlabel, ylabel, title = panel.labels
        style_axes(
            ax,
            xlabel=xlabel,
            ylabel=ylabel,
            title=title,
            xlog=panel.xlog,
            ylog=panel.ylog,
            reference=panel.reference,
        )
    return fig


def plot_lines(
    ax: Axes,
    rows: Sequence[Mapping[str, Any]],
    x: str,
    y: str,
    line: Callable[[Mapping[str, Any]], str],
    *,
    scale: float = 1.0,
    order: str | None = None,
) -> None:
    """One line per label `line(row)`, points (row[x], scale * row[y]) joined in the order of
    row[order] (default: x); rows missing x or y are skipped."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get(x) is not None and row.get(y) is not None:
            groups.setdefault(line(row), []).append(row)
    for label, sel in groups.items():
        sel = sorted(sel, key=lambda r: r[order or x])
        ax.plot([r[x] for r in sel], [scale * r[y] for r in sel], marker="o", ms=3, label=label)


def save_png(fig: Figure, record: Mapping[str, Any], out: Path) -> Path:
    """Name the machine under the figure; write it as `<out>.png` (report.figures.save_figure)."""
    from msvlad.report.figures import save_figure

    fig.supxlabel(machine_caption(record.get("environment", {})), fontsize=7, color="dimgrey")
    png = Path(out).resolve().with_suffix(".png")
    (written,) = save_figure(fig, png.parent.name, png.stem, png.parent.parent, pdf=False)
    return written


# ----------------------------------------------------------------------------- JSON


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
