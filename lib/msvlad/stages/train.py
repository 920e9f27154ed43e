"""`train` stage: k-means init, mining rounds and triplet steps (resumable), whitening.

`run` trains (off-the-shelf rows copy the init); `run_stage` is what the DVC stage of a
results-table row runs: `cluster`, `train` and `whiten` one after the other in one process, so a
row pays for start-up (imports, the network build, DVC's bookkeeping of a stage) once, not three
times. Each step is the same function its own command (`msvlad cluster`, `msvlad whiten`) calls.
"""

from __future__ import annotations

import logging
from pathlib import Path

from msvlad.config import Params
from msvlad.errors import InputError
from msvlad.nn.model import load_model
from msvlad.storage import check_writable, file_digest

log = logging.getLogger(__name__)


def run(
    params: Params,
    init: Path,
    out: Path,
    method: str | None = None,
    max_steps: int | None = None,
    restart: str | None = None,
) -> Path:
    """Train `method` (a results-table row) from `init` into the run folder `out`.

    `restart`: None resumes a run with the same parameters and refuses one with others;
    "always" moves any earlier run aside first, "if-changed" only one with other parameters.
    An off-the-shelf row (`miner: null`) is a run of its own: its model.pt is the init, and a
    folder holding a trained run is refused or moved aside like any run of other parameters.
    In the runs/<row>/train layout a finished run of another row with the same training, budget
    and init is copied instead of trained again (not with "always").
    """
    if max_steps is not None and max_steps < 0:
        raise InputError(f"--max-steps: {max_steps} must be >= 0")
    check_writable(out)
    if not init.is_file():
        raise FileNotFoundError(
            f"{init}: initial model not found (run `msvlad cluster` first, or train with --cluster)"
        )
    if method and params.methods[method].miner is None:
        from msvlad.training.rundir import off_the_shelf

        digest = file_digest(init)
        load_model(init, expect=params.model)  # a corrupt file or another network is refused
        model = off_the_shelf(out, params, init, digest, restart)
        log.info("%s is off-the-shelf: no training, %s is a copy of %s", method, model, init)
        return model
    from msvlad.training.trainer import train

    # the other rows' runs (runs/<row>/train): one with the same training is copied, not redone
    rows = out.parent.parent if method and out.parent.name == method else None
    twins = [rows / m / out.name for m in params.methods if m != method] if rows else []
    return train(params, init, out, max_steps=max_steps, restart=restart, twins=twins)


def run_stage(
    params: Params,
    init: Path,
    out: Path,
    method: str | None = None,
    *,
    cluster: bool = False,
    whiten: Path | None = None,
    max_steps: int | None = None,
    restart: str | None = None,
) -> Path:
    """`cluster` into `init` (when asked), train into `out`, then `whiten` into `whiten` (if given).

    Returns the last model written: the whitened one, else the run's model.pt. The init is
    written by k-means every time (seeded: the same bytes for the same params and data), so a
    finished run whose init digest matches is kept by `restart="if-changed"`.
    """
    if cluster:
        from msvlad.stages import cluster as clustering

        clustering.run(params, init)
    model = run(params, init, out, method, max_steps, restart)
    if whiten is None:
        return model
    from msvlad.stages import whiten as whitening

    return whitening.run_checkpoint(params, model, whiten)
