"""Shared helpers of the benchmark scripts: run set-up, timing, peak memory, tables, JSON and plots.

House rule: speed and memory are reported as RATIOS against a baseline measured in the same process
(same machine, threads and inputs); absolute seconds are recorded for context, never asserted.

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
from typing import Any

import numpy as np
import torch

from msvlad.paths import ROOT
from msvlad.runtime import resolve_device
from msvlad.storage import atomic_path, write_json

RESULTS_DIR = ROOT / "results" / "bench"
MIB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------- arguments and set-up


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Parser with the options every benchmark shares (--out, --device, --repeats, ...)."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help="JSON result file; the plot is written next to it with a .png suffix",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available, else CPU",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    return parser


def int_list(text: str) -> list[int]:
    """argparse type: "1,2,4" -> [1, 2, 4] (positive integers)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


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


def setup_run(args: argparse.Namespace) -> torch.device:
    """Apply --threads and --seed and resolve --device (CUDA when available under auto)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    return resolve_device(args.device)


# ----------------------------------------------------------------------------- environment facts


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """Human-readable name of the device that ran the benchmark."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def environment_info(device: torch.device) -> dict[str, Any]:
    """Machine and library facts recorded in every result file."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["cuda_version"] = torch.version.cuda
        info["cudnn_version"] = torch.backends.cudnn.version()
    try:
        import faiss

        info["faiss_version"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    return info


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
        """Fastest run in seconds."""
        return float(min(self.times))

    def to_json(self) -> dict[str, Any]:
        """Median, best and every run, in seconds."""
        return {"median_s": self.median, "best_s": self.best, "runs_s": list(self.times)}


def time_call(
    fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, device: torch.device | None = None
) -> Timing:
    """Run fn `warmup` times untimed, then time `repeats` runs (CUDA synchronised around each)."""
    if repeats < 1:
        raise ValueError(f"repeats: expected a positive integer, got {repeats}")
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


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


def resident_bytes() -> int:
    """Current resident set size of this process in bytes (0 where /proc is unavailable)."""
    return (_proc_status_kib("VmRSS") or 0) * 1024


def memory_method(device: torch.device) -> str:
    """Which peak-memory method `PeakMemory` uses on this device (for the result file)."""
    with PeakMemory(device) as probe:
        pass
    return probe.method


# ----------------------------------------------------------------------------- tables


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.4g}" if abs(v) < 1 else f"{v:.3f}".rstrip("0").rstrip(".")
        return f"{v:.2e}"
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Plain-text table: one line per row, numbers right-aligned, text left-aligned."""
    if not rows:
        return "(no rows)"
    columns = list(columns) if columns is not None else list(rows[0])
    headers = dict(headers or {})
    cells = [[headers.get(c, c) for c in columns]]
    numeric = [True] * len(columns)
    for row in rows:
        line = []
        for j, c in enumerate(columns):
            v = row.get(c)
            if v is not None and not isinstance(v, int | float | np.integer | np.floating):
                numeric[j] = False
            line.append(_fmt(v))
        cells.append(line)
    widths = [max(len(r[j]) for r in cells) for j in range(len(columns))]

    def render(line: list[str]) -> str:
        parts = [
            v.rjust(w) if numeric[j] else v.ljust(w)
            for j, (v, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [render(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(render(line) for line in cells[1:])
    return "\n".join(out)


# ----------------------------------------------------------------------------- outputs


def plot_path(out: Path) -> Path:
    """The PNG written beside a JSON result file."""
    return Path(out).with_suffix(".png")


def new_figure(
    ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 3.8)
) -> tuple[Any, Any]:
    """A matplotlib (figure, axes array) on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False
    )
    return fig, axes


def save_figure(fig: Any, path: Path) -> Path:
    """Save a figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_results(
    out: Path, name: str, args: argparse.Namespace, device: torch.device, results: dict[str, Any]
) -> dict[str, Any]:
    """Assemble the record (benchmark, arguments, environment, results); write it atomically."""
    record = {
        "benchmark": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment_info(device),
        "memory_method": memory_method(device),
        **results,
    }
    record = _clean(record)
    write_json(out, record)
    return record


def report(text: str, args: argparse.Namespace) -> None:
    """Print a result table unless --quiet."""
    if not getattr(args, "quiet", False):
        print(text, flush=True)
