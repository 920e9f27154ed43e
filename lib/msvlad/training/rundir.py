"""A training run's folder: what may resume in it, and how a run is set aside instead of lost.

`open_run` is called before a run trains. It locks the folder (one trainer at a time), removes the
temp files of writes a kill interrupted, and compares the parameters recorded by the run already
there (`run.json`, or the checkpoint of a run from before `run.json` existed) with the new ones:

- same run signature: resume from `checkpoint.pt` (or start over if none was written yet), with
  every log cut back to what the checkpoint covers, so the logs equal an uninterrupted run's;
- other parameters: stop with `RunConflictError` listing the differing keys, touching nothing;
- `restart="always"` (or `"if-changed"` and other parameters): every file of the old run is moved
  to `<out>.previous/<timestamp>/` (a name never reused) and the run starts in an empty folder.
  Nothing is ever deleted. The previous runs sit beside the run folder, not in it, so a DVC
  out such as `runs/<method>/train` never caches or hashes them.
- the initial model is part of what a run is: another init (after a new k-means) is another run.
- a run that would start from nothing first looks at its `twins` (the other rows' run folders):
  a finished run there with the same run signature, step budget and initial model (`run.json`
  records the init's sha256) is the same training, so its files are copied in and the run is
  already finished (rows differing only in their test-time policy train once); "always" skips this.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from msvlad.config import Params, params_to_dict
from msvlad.errors import InputError, RunConflictError
from msvlad.runtime import Dist, code_version
from msvlad.storage import (
    atomic_path,
    check_writable,
    load_torch,
    read_json,
    remove_stale_temps,
    write_json,
)
from msvlad.training.checkpoint import run_signature, signature_diff
from msvlad.training.logs import RUN_LOGS, last_logged_step, truncate_logs

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
Restart = Literal["always", "if-changed"]


def previous_dir(out: Path) -> Path:
    """Where runs moved aside by a restart go: beside the run folder."""
    return out.parent / f"{out.name}.previous"


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder (a second trainer there is an error)."""
    check_writable(out)
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    fh = (out / LOCK).open("a")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out}: another msvlad train is running in this folder") from None
        yield
    finally:
        fh.close()


def open_run(
    out: Path,
    params: Params,
    restart: Restart | None,
    device: torch.device,
    dist: Dist,
    init_digest: str | None = None,
    twins: Sequence[Path] = (),
) -> dict[str, Any] | None:
    """Make `out` ready for this run (main rank); every rank gets the checkpoint to resume."""
    state = _prepare(out, params, restart, device, init_digest, twins) if dist.main else None
    if dist.world > 1:
        torch.distributed.barrier()
        if not dist.main and (out / CHECKPOINT).is_file():
            state = load_torch(out / CHECKPOINT, device)
    return state


def _prepare(
    out: Path,
    params: Params,
    restart: Restart | None,
    device: torch.device,
    init_digest: str | None = None,
    twins: Sequence[Path] = (),
) -> dict[str, Any] | None:
    remove_stale_temps(out)
    ckpt_path = out / CHECKPOINT
    leftovers = [p.name for p in sorted(out.iterdir()) if p.name != LOCK]
    if leftovers and restart == "always":  # before reading anything: it may be corrupt
        log.info("previous run in %s moved to %s", out, _move_aside(out))
    state = load_torch(ckpt_path, device) if ckpt_path.is_file() else None
    record = read_run_record(out / RUN_FILE) if (out / RUN_FILE).is_file() else None
    recorded = [record["params"]] if record else []
    if state is not None:
        recorded.append(state.get("params", {}))
    new = run_signature(params_to_dict(params))
    diff = sorted({d for old in recorded for d in signature_diff(run_signature(old), new)})
    if record and init_digest and record.get("init", init_digest) != init_digest:
        diff.append(f"init: sha256 {record['init'][:12]} -> {init_digest[:12]}")
    if not recorded and any(p.name in RUN_LOGS or p.name == "model.pt" for p in out.iterdir()):
        diff = ["<unknown>: the folder holds a run without run.json or checkpoint.pt"]
    if diff and restart == "if-changed":
        log.info("previous run in %s moved to %s", out, _move_aside(out))
        state = None
    elif diff:
        raise RunConflictError(
            f"{ckpt_path if state is not None else out}: the run there was made with other "
            f"parameters ({'; '.join(diff)}); rerun with the same parameters to resume it, or "
            f"pass --restart to move it to {previous_dir(out)}/ and start over"
        )
    if state is None and restart != "always" and init_digest is not None:
        twin = finished_twin(twins, out, params, init_digest)
        if twin is not None:
            _copy_run(twin, out)
            log.info("%s: the same training as the finished run %s, copied from there", out, twin)
            state = load_torch(ckpt_path, device)
    current = params_to_dict(params)
    if record is None or record["params"] != current or record.get("init") != init_digest:
        write_json(out / RUN_FILE, {"params": current, "code": code_version(), "init": init_digest})
    if state is None:
        truncate_logs(out, -1, 0)  # rows logged before a first checkpoint are written again
    else:
        truncate_logs(out, int(state["step"]), int(state["round"]))
    return state


def finished_twin(
    twins: Sequence[Path], out: Path, params: Params, init_digest: str
) -> Path | None:
    """The first of `twins` holding a finished run of this training: same run signature, step
    budget and initial model (runs recorded without their init's digest are never twins)."""
    signature = run_signature(params_to_dict(params))
    total = params.train.epochs * params.train.steps_per_epoch
    needed = (RUN_FILE, CHECKPOINT, "model.pt", "log.csv")
    for twin in twins:
        if twin.resolve() == out.resolve() or not all((twin / n).is_file() for n in needed):
            continue
        try:
            record = read_run_record(twin / RUN_FILE)
        except InputError:
            continue
        rec_train = record["params"].get("train", {})
        same = (
            record.get("init") == init_digest
            and run_signature(record["params"]) == signature
            and rec_train.get("epochs", 0) * rec_train.get("steps_per_epoch", 0) == total
        )
        if same and last_logged_step(twin / "log.csv") == total:
            return twin
    return None


def _copy_run(src: Path, out: Path) -> None:
    """Copy a finished run's files into `out`, each atomically, the checkpoint last (a copy cut
    short is then either resumable from that checkpoint or an unknown folder moved aside)."""
    names = sorted(
        p.name
        for p in src.iterdir()
        if p.is_file() and p.name not in (LOCK, RUN_FILE, CHECKPOINT) and not p.name.startswith(".")
    )
    for name in [*names, CHECKPOINT]:
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src / name, tmp)


def read_run_record(path: Path) -> dict[str, Any]:
    """A run.json: the parameters, the code version and the initial model's sha256 (if known)."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise InputError(f"{path}: not a msvlad run record (no params)")
    return data


def _move_aside(out: Path) -> Path:
    """Rename every entry of `out` into a new, never reused `<out>.previous/<timestamp>/`."""
    base = previous_dir(out)
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    n = 0
    while True:
        target = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            target.mkdir()
            break
        except FileExistsError:
            n += 1
    for entry in sorted(out.iterdir()):
        if entry.name != LOCK:
            os.replace(entry, target / entry.name)
    return target
