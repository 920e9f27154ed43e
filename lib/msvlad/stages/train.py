"""`train` stage: mining rounds and triplet steps (resumable); off-the-shelf rows copy the init."""

from __future__ import annotations

import logging
from pathlib import Path

from msvlad.config import Params
from msvlad.errors import InputError
from msvlad.storage import check_writable, load_torch, write_bytes
from msvlad.training.logs import LOG_FIELDS, write_header

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
    In the runs/<row>/train layout a finished run of another row with the same training, budget
    and init is copied instead of trained again (not with "always").
    """
    if max_steps is not None and max_steps < 0:
        raise InputError(f"--max-steps: {max_steps} must be >= 0")
    check_writable(out)
    if not init.is_file():
        raise FileNotFoundError(f"{init}: initial model not found (run `msvlad cluster` first)")
    if method and params.methods[method].miner is None:
        load_torch(init)  # refuse a corrupt file before copying it
        write_bytes(out / "model.pt", init.read_bytes())
        write_header(out / "log.csv", LOG_FIELDS)
        log.info("%s is off-the-shelf: no training, %s copied", method, init)
        return out / "model.pt"
    from msvlad.training.trainer import train

    # the other rows' runs (runs/<row>/train): one with the same training is copied, not redone
    rows = out.parent.parent if method and out.parent.name == method else None
    twins = [rows / m / out.name for m in params.methods if m != method] if rows else []
    return train(params, init, out, max_steps=max_steps, restart=restart, twins=twins)
