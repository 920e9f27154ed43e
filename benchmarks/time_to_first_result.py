"""Time to first result: a fresh clone's `dvc repro`, per stage kind, then the checks a user sees.

Clones a commit into a scratch folder, runs `dvc repro` there with a fresh $MSVLAD_CACHE (the
package install is excluded: the clone runs on the interpreter of --venv, with its own `lib/` first
on PYTHONPATH), and times every stage from DVC's own output, each line stamped as it arrives:

- a stage runs from its "Running stage 'x':" line to the "Updating lock file" line after it, so its
  time includes DVC hashing and caching its outputs; the time between one stage's lock update and
  the next stage's start (DVC checking what changed, and checking out the outputs of a stage whose
  committed results are already in its cache instead of running it) is "dvc (between stages)";
- per stage kind (prepare, train, evaluate, report): count, total, mean, min, max.

Then it checks that the clone's `git status` and `dvc status` are clean (every hashed output is
byte-identical to the committed dvc.lock) and times a second `dvc repro`, which must run nothing.
The machine's load average is sampled every few seconds during the run: compare numbers taken on
a quiet machine only (the load says how quiet it was); the CPU time of every process the repro
ran (user + system) is recorded too, a figure a busy machine inflates much less than wall time.

    python -m benchmarks.time_to_first_result                        # HEAD of this repository
    python -m benchmarks.time_to_first_result --commit main --json results/bench/ttfr.json
    python -m benchmarks.time_to_first_result --params scratch.yaml   # e.g. more rows (lock dirty)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# pipeline order; cluster and whiten were stages of their own before a row's train stage ran them
# (kept to read the records of that time, e.g. results/bench/ttfr_before.json)
KINDS = ("prepare", "cluster", "train", "whiten", "evaluate", "report")
START = re.compile(r"Running stage '([^']+)'")
LOCK = re.compile(r"Updating lock file")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change")
RESTORED = re.compile(r"Stage '([^']+)' is cached")  # its outputs checked out, not run
BETWEEN = "dvc (between stages)"


@dataclass
class StageTime:
    """One stage run by `dvc repro`: its name and seconds (command + DVC's hashing of its outs)."""

    name: str
    seconds: float

    @property
    def kind(self) -> str:
        return self.name.split("@", 1)[0]


@dataclass
class Repro:
    """What one `dvc repro` did: stages run, skipped, restored from the DVC cache (outputs equal
    to objects already there: checked out instead of run), seconds between stages, wall time."""

    stages: list[StageTime] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    between: float = 0.0
    wall: float = 0.0
    returncode: int = 0
    cpu: float = 0.0  # user + system seconds of dvc and every process it ran


def parse_stamped(lines: Iterable[tuple[float, str]], start: float, end: float) -> Repro:
    """Stage times from (time, line) pairs of `dvc repro` output stamped as they arrived."""
    out = Repro(wall=end - start)
    current: tuple[str, float] | None = None
    last_end = start
    for t, line in lines:
        if m := START.search(line):
            if current is not None:  # no lock update in between (a failed or odd stage)
                out.stages.append(StageTime(current[0], t - current[1]))
                last_end = t
            out.between += t - last_end
            current = (m.group(1), t)
        elif LOCK.search(line) and current is not None:
            out.stages.append(StageTime(current[0], t - current[1]))
            current, last_end = None, t
        elif m := SKIPPED.search(line):
            out.skipped.append(m.group(1))
        elif m := RESTORED.search(line):
            out.restored.append(m.group(1))
    if current is not None:
        out.stages.append(StageTime(current[0], end - current[1]))
        last_end = end
    out.between += end - last_end
    return out


def by_kind(repro: Repro) -> list[dict[str, Any]]:
    """One row per stage kind (pipeline order, then any other), DVC's own time last."""
    kinds = list(KINDS) + sorted({s.kind for s in repro.stages} - set(KINDS))
    rows = []
    for kind in kinds:
        secs = [s.seconds for s in repro.stages if s.kind == kind]
        if not secs:
            continue
        rows.append(
            {
                "stage": kind,
                "count": len(secs),
                "total_s": round(sum(secs), 1),
                "mean_s": round(statistics.mean(secs), 1),
                "min_s": round(min(secs), 1),
                "max_s": round(max(secs), 1),
            }
        )
    n = len(repro.stages)
    rows.append(
        {
            "stage": BETWEEN,
            "count": n,
            "total_s": round(repro.between, 1),
            "mean_s": round(repro.between / max(n, 1), 1),
            "min_s": None,
            "max_s": None,
        }
    )
    return rows


def table(rows: Sequence[dict[str, Any]], wall: float) -> str:
    """The per-kind table as markdown, the total wall time last."""
    head = "| stage | count | total | per stage (mean, min-max) |\n|---|--:|--:|--:|"
    lines = [head]
    for r in rows:
        spread = "" if r["min_s"] is None else f" ({r['min_s']:.1f}-{r['max_s']:.1f})"
        lines.append(
            f"| {r['stage']} | {r['count']} | {_minutes(r['total_s'])} | "
            f"{r['mean_s']:.1f} s{spread} |"
        )
    lines.append(f"| **total (wall)** | | **{_minutes(wall)}** | |")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class LoadSampler:
    """The 1-minute load average every `every` seconds in a background thread."""

    def __init__(self, every: float = 5.0) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(statistics.mean(s), 2), "max": round(max(s), 2), "n": len(s)}


def run_stamped(cmd: Sequence[str], cwd: Path, env: dict[str, str], log: Path) -> Repro:
    """Run `cmd`, stamping every output line as it arrives (echoed to `log`); its stage times."""
    stamped: list[tuple[float, str]] = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with log.open("a", buffering=1) as fh:  # line-buffered: the log can be followed live
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.monotonic()
            stamped.append((t, line))
            fh.write(f"[{t - start:8.1f}] {line}")
        code = proc.wait()
    repro = parse_stamped(stamped, start, time.monotonic())
    repro.returncode = code
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    repro.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return repro


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def environment(venv: Path, clone: Path, cache: Path) -> dict[str, str]:
    """The user's shell after `. .venv/bin/activate`: the venv first on PATH, the clone's code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_A_USERS)}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONPATH"] = str(clone / "lib")  # the clone's package, not the venv's editable install
    env["MSVLAD_CACHE"] = str(cache)  # fresh: nothing computed before
    return env


# settings of this shell a new user's does not have: msvlad's own, thread caps, Python paths
_NOT_A_USERS = ("MSVLAD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "VIRTUAL_ENV")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Clone, repro, check, repro again; the record (also printed as tables)."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="msvlad-ttfr-"))
    work.mkdir(parents=True, exist_ok=True)
    clone, cache, log = work / "clone", work / "cache", work / "repro.log"
    commit = _git("rev-parse", args.commit, cwd=args.repo)
    subprocess.run(["git", "clone", "-q", str(args.repo), str(clone)], check=True)
    _git("checkout", "-q", "--detach", commit, cwd=clone)
    if args.params:
        shutil.copyfile(args.params, clone / "params.yaml")
    env = environment(args.venv, clone, cache)
    dvc = [str(args.venv / "bin" / "dvc")]
    print(f"clone of {commit[:12]} in {clone}; log: {log}", file=sys.stderr)
    load_before = list(os.getloadavg())
    with LoadSampler() as load:
        first = run_stamped([*dvc, "repro"], clone, env, log)
    record: dict[str, Any] = {
        "commit": commit,
        "params": str(args.params) if args.params else "params.yaml of the commit",
        "cpu_count": os.cpu_count(),
        "load_before": [round(v, 2) for v in load_before],
        "load_during": load.summary(),
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "repro": {**asdict(first), "by_kind": by_kind(first)},
    }
    git_status = _git("status", "--porcelain", cwd=clone)
    dvc_status = subprocess.run(
        [*dvc, "status"], cwd=clone, env=env, capture_output=True, text=True
    ).stdout.strip()
    record["git_status"] = git_status.splitlines()
    record["dvc_status"] = dvc_status.splitlines()
    record["clean"] = not git_status and dvc_status in ("", "Data and pipelines are up to date.")
    second = run_stamped([*dvc, "repro"], clone, env, log)
    record["second_repro"] = {
        "wall_s": round(second.wall, 1),
        "stages_run": [s.name for s in second.stages],
        "returncode": second.returncode,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return record


def report(record: dict[str, Any]) -> str:
    """The printed summary: the table, the load, the checks."""
    first = record["repro"]
    lines = [
        table(first["by_kind"], first["wall"]),
        "",
        f"CPU time (user + system, every process): {_minutes(first['cpu'])}",
        f"commit {record['commit'][:12]}, {record['cpu_count']} CPUs; load (1 min) "
        f"{record['load_before'][0]:.2f} before, mean {record['load_during']['mean']:.2f} "
        f"(max {record['load_during']['max']:.2f}) during, {record['load_after'][0]:.2f} after",
        f"dvc repro exit {first['returncode']}: {len(first['stages'])} stages run, "
        f"{len(first['restored'])} restored from the DVC cache, {len(first['skipped'])} skipped",
        f"git status and dvc status clean: {record['clean']}",
    ]
    if not record["clean"]:
        lines += [f"  git: {s}" for s in record["git_status"][:10]]
        lines += [f"  dvc: {s}" for s in record["dvc_status"][:10]]
    again = record["second_repro"]
    lines.append(
        f"second dvc repro: {again['wall_s']:.1f} s, stages run: {again['stages_run'] or 'none'}"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.time_to_first_result", description=__doc__.splitlines()[0]
    )
    p.add_argument("--repo", type=Path, default=ROOT, help="Repository to clone (default: this).")
    p.add_argument("--commit", default="HEAD", help="Commit to clone (default HEAD).")
    p.add_argument(
        "--venv",
        type=Path,
        default=Path(sys.prefix),
        help="Virtual environment to run in (default: the current interpreter's).",
    )
    p.add_argument("--params", type=Path, help="A params.yaml to put in the clone first.")
    p.add_argument("--workdir", type=Path, help="Scratch folder (default: a new temp folder).")
    p.add_argument("--keep", action="store_true", help="Keep the clone, cache and log.")
    p.add_argument("--json", type=Path, help="Also write the record as JSON here.")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    record = measure(args)
    print(report(record))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    ok = record["repro"]["returncode"] == 0 and not record["second_repro"]["stages_run"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
