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
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from msvlad.config import Params, params_to_dict
from msvlad.errors import InputError, RunConflictError
from msvlad.runtime import Dist, code_version
from msvlad.storage import check_writable, load_torch, read_json, remove_stale_temps, write_json
from msvlad.training.checkpoint import run_signature, signature_diff
from msvlad.training.logs import RUN_LOGS, truncate_logs

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
    out: Path, params: Params, restart: Restart | None, device: torch.device, dist: Dist
) -> dict[str, Any] | None:
    """Make `out` ready for this run (main rank); every rank gets the checkpoint to resume."""
    state = _prepare(out, params, restart, device) if dist.main else None
    if dist.world > 1:
        torch.distributed.barrier()
        if not dist.main and (out / CHECKPOINT).is_file():
            state = load_torch(out / CHECKPOINT, device)
    return state


def _prepare(
    out: Path, params: Params, restart: Restart | None, device: torch.device
) -> dict[str, Any] | None:
    remove_stale_temps(out)
    ckpt_path = out / CHECKPOINT
    leftovers = [p.name for p in sorted(out.iterdir()) if p.name != LOCK]
    if leftovers and restart == "always":  # before reading anything: it may be corrupt
        log.info("previous run in %s moved to %s", out, _move_aside(out))
    state = load_torch(ckpt_path, device) if ckpt_path.is_file() else None
    recorded = [_recorded_params(out / RUN_FILE)] if (out / RUN_FILE).is_file() else []
    if state is not None:
        recorded.append(state.get("params", {}))
    new = run_signature(params_to_dict(params))
    diff = sorted({d for old in recorded for d in signature_diff(run_signature(old), new)})
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
    current = params_to_dict(params)
    if not (out / RUN_FILE).is_file() or _recorded_params(out / RUN_FILE) != current:
        write_json(out / RUN_FILE, {"params": current, "code": code_version()})
    if state is None:
        truncate_logs(out, -1, 0)  # rows logged before a first checkpoint are written again
    else:
        truncate_logs(out, int(state["step"]), int(state["round"]))
    return state


def _recorded_params(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise InputError(f"{path}: not a msvlad run record (no params)")
    return data["params"]


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
