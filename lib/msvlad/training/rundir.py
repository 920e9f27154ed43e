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
- a run that would start from nothing first looks at its `twins` (the other rows' run folders)
  and at the runs set aside in `<out>.previous/`: a finished run there with the same run
  signature, step budget and initial model (`run.json` records the init's sha256), whose
  checkpoint and model verify by their checksums and agree, is the same training, so its files
  are copied in and the run is already finished (rows differing only in their test-time policy
  train once; parameters changed and changed back restore the run); "always" skips this.

An off-the-shelf row (`miner: null`) is a run too (`off_the_shelf`): its model.pt is a verified
copy of the initial model, its run.json says `"trained": false`, and it obeys the same rules, so a
trained run is never replaced by an untrained copy (nor the reverse) without --restart, and then
only after it was moved aside. Such a copy depends on its initial model alone.
Every checkpoint and model file read here must carry its checksum (`storage.load_torch`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from msvlad.config import Params, params_to_dict
from msvlad.errors import CheckpointError, InputError, RunConflictError
from msvlad.paths import CHECKPOINT, LOG, MODEL, RUN_FILE
from msvlad.runtime import Dist, code_version
from msvlad.storage import (
    atomic_path,
    check_writable,
    file_digest,
    load_torch,
    payload_digest,
    read_json,
    remove_stale_temps,
    write_bytes,
    write_json,
)
from msvlad.training.checkpoint import RunProgress, run_signature, signature_diff
from msvlad.training.logs import (
    LOG_FIELDS,
    RUN_LOGS,
    last_logged_step,
    truncate_logs,
    write_header,
)

log = logging.getLogger(__name__)

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
    restore: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any] | None:
    """Make `out` ready for this run (main rank); every rank gets the checkpoint to resume.

    `restore` loads the checkpoint into the trainer; on the main rank it runs before anything in
    the folder changes, so a checkpoint that does not fit is refused with the folder untouched.
    """
    args = (out, params, restart, device, init_digest, twins, restore)
    state = _prepare(*args) if dist.main else None
    if dist.world > 1:
        torch.distributed.barrier()
        if not dist.main and (out / CHECKPOINT).is_file():
            state = load_checkpoint(out / CHECKPOINT, device)
            if restore is not None:
                restore(state)
    return state


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A run's checkpoint.pt: verified by its checksum, and holding a run's progress."""
    state = load_torch(path, device, require_digest=True)
    try:
        RunProgress().load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        what = f"no {err}" if isinstance(err, KeyError) else " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: not a msvlad training checkpoint ({what})") from None
    return state


def _prepare(
    out: Path,
    params: Params,
    restart: Restart | None,
    device: torch.device,
    init_digest: str | None = None,
    twins: Sequence[Path] = (),
    restore: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any] | None:
    remove_stale_temps(out)
    ckpt_path = out / CHECKPOINT
    _move_aside_if_always(out, restart)
    record = _recorded_run(out, init_digest)
    state = None
    if record is not None and record.get("trained", True) is False:
        diff = [f"miner: null (off-the-shelf, not trained) -> {params.miner.name!r} (trained)"]
    else:
        state = load_checkpoint(ckpt_path, device) if ckpt_path.is_file() else None
        recorded = [record["params"]] if record else []
        if state is not None:
            recorded.append(state.get("params", {}))
        new = run_signature(params_to_dict(params))
        diff = sorted({d for old in recorded for d in signature_diff(run_signature(old), new)})
        if not recorded and _holds_run_files(out):
            diff = ["<unknown>: the folder holds a run without run.json or checkpoint.pt"]
    if record and init_digest and record.get("init", init_digest) != init_digest:
        diff.append(f"init: sha256 {record['init'][:12]} -> {init_digest[:12]}")
    if diff and restart == "if-changed":
        log.info("previous run in %s moved to %s", out, _move_aside(out))
        state, record = None, None
    elif diff:
        raise _conflict(ckpt_path if state is not None else out, out, diff)
    if state is None and restart != "always" and init_digest is not None:
        twin = finished_twin([*previous_runs(out), *twins], out, params, init_digest)
        if twin is not None:
            _copy_run(twin, out)
            log.info("%s: the same training as the finished run %s, copied from there", out, twin)
            state = load_checkpoint(ckpt_path, device)
    if state is not None and restore is not None:
        restore(state)
    current = params_to_dict(params)
    if record is None or record["params"] != current or record.get("init") != init_digest:
        write_json(out / RUN_FILE, {"params": current, "code": code_version(), "init": init_digest})
    if state is None:
        truncate_logs(out, -1, 0)  # rows logged before a first checkpoint are written again
    else:
        truncate_logs(out, int(state["step"]), int(state["round"]))
    return state


def off_the_shelf(
    out: Path, params: Params, init: Path, init_digest: str, restart: Restart | None
) -> Path:
    """An untrained row's run: model.pt is a copy of `init` (verified, of sha256 `init_digest`),
    log.csv has no row.

    The folder obeys the rules of a trained run: a run of another kind or from another init is
    refused (or moved aside with `restart`); the same copy already there is left as it is.
    """
    check_writable(out)
    with locked(out):
        remove_stale_temps(out)
        _move_aside_if_always(out, restart)
        data = init.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != init_digest:
            raise InputError(f"{init}: changed while it was read; rerun")
        record = _recorded_run(out, digest)
        diff = []
        if record is not None and record.get("trained", True) is not False:
            miner = record["params"].get("miner")
            trained = miner.get("name") if isinstance(miner, dict) else miner
            diff.append(f"miner: {trained!r} (trained) -> null (off-the-shelf, not trained)")
        elif record is None and ((out / CHECKPOINT).is_file() or _holds_run_files(out)):
            diff.append("<unknown>: the folder holds a run without run.json")
        if record is not None and record.get("init", digest) != digest:
            diff.append(f"init: sha256 {str(record['init'])[:12]} -> {digest[:12]}")
        if diff and restart == "if-changed":
            log.info("previous run in %s moved to %s", out, _move_aside(out))
            record = None
        elif diff:
            raise _conflict(out, out, diff)
        if record is None:  # a copy an older msvlad left keeps its files as they are
            record = {"params": params_to_dict(params), "code": code_version(), "init": digest}
            write_json(out / RUN_FILE, {**record, "trained": False})
        model = out / MODEL
        if not model.is_file() or file_digest(model) != digest:
            if model.is_file():
                log.warning("%s: not the copy of %s it should be: copied again", model, init)
            write_bytes(model, data)
        if not (out / LOG).is_file():
            write_header(out / LOG, LOG_FIELDS)
    return model


def _conflict(path: Path, out: Path, diff: list[str]) -> RunConflictError:
    return RunConflictError(
        f"{path}: the run there was made with other parameters ({'; '.join(diff)}); rerun with "
        f"the same parameters to resume it, or pass --restart to move it to {previous_dir(out)}/ "
        "and start over"
    )


def _holds_run_files(out: Path) -> bool:
    return any(p.name in RUN_LOGS or p.name == MODEL for p in out.iterdir())


def _move_aside_if_always(out: Path, restart: Restart | None) -> None:
    """restart="always": set everything aside before reading anything (it may be corrupt)."""
    if restart == "always" and [p for p in out.iterdir() if p.name != LOCK]:
        log.info("previous run in %s moved to %s", out, _move_aside(out))


def _recorded_run(out: Path, init_digest: str | None) -> dict[str, Any] | None:
    """The folder's run.json; for a folder an older msvlad made for an off-the-shelf row (only
    model.pt, equal to the init, and a log.csv without rows) the record it would have written."""
    if (out / RUN_FILE).is_file():
        return read_run_record(out / RUN_FILE)
    names = {p.name for p in out.iterdir() if p.name != LOCK and not p.name.startswith(".")}
    if (
        init_digest is not None
        and names == {MODEL, LOG}
        and last_logged_step(out / LOG) is None
        and file_digest(out / MODEL) == init_digest
    ):
        return {"params": {}, "init": init_digest, "trained": False}
    return None


def previous_runs(out: Path) -> list[Path]:
    """The runs a restart set aside from `out`, the latest first."""
    base = previous_dir(out)
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)


def finished_twin(
    twins: Sequence[Path], out: Path, params: Params, init_digest: str
) -> Path | None:
    """The first of `twins` holding a finished run of this training: same run signature, step
    budget and initial model (runs recorded without their init's digest are never twins), with
    a checkpoint and a model.pt that verify by their checksums and hold the same weights."""
    signature = run_signature(params_to_dict(params))
    total = params.train.epochs * params.train.steps_per_epoch
    needed = (RUN_FILE, CHECKPOINT, MODEL, LOG)
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
            and record.get("trained", True) is not False
            and run_signature(record["params"]) == signature
            and rec_train.get("epochs", 0) * rec_train.get("steps_per_epoch", 0) == total
        )
        if same and last_logged_step(twin / LOG) == total:
            problem = _unfinished(twin, total)
            if problem is None:
                return twin
            log.warning("%s: not copied (%s)", twin, problem)
    return None


def _unfinished(run: Path, total: int) -> str | None:
    """Why a finished-looking run folder cannot be trusted (None: its files verify)."""
    try:
        state = load_checkpoint(run / CHECKPOINT)
        model = load_torch(run / MODEL, require_digest=True)
    except (InputError, OSError) as err:
        return " ".join(str(err).split())
    if int(state["step"]) != total:
        return f"{CHECKPOINT} is at step {int(state['step'])}, not {total}"
    return stale_model(model, state["model"], total)


def stale_model(model: Any, weights: dict[str, torch.Tensor], step: int) -> str | None:
    """Why a loaded model.pt is not the model of `weights` at `step` (None: it is)."""
    if not isinstance(model, dict) or not isinstance(model.get("state_dict"), dict):
        return "model.pt holds no state_dict"
    if model.get("step") != step:
        return f"model.pt is the model of step {model.get('step')}, not of step {step}"
    if payload_digest(model["state_dict"]) != payload_digest(weights):
        return f"model.pt holds other weights than the checkpoint of step {step}"
    return None


def model_needs_writing(final: Path, weights: dict[str, torch.Tensor], step: int) -> bool:
    """model.pt is missing, unverifiable or not the model of the final checkpoint (logged)."""
    if not final.is_file():
        return True
    try:
        problem = stale_model(load_torch(final, require_digest=True), weights, step)
    except (InputError, OSError) as err:
        problem = " ".join(str(err).split()).removeprefix(f"{final}: ")  # named once, below
    if problem:
        log.warning("%s: %s; written again from %s", final, problem, CHECKPOINT)
    return problem is not None


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
