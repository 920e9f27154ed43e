"""`train` stage: mining rounds and triplet steps (resumable); off-the-shelf rows copy the init."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from msvlad.config import Params
from msvlad.training.logs import LOG_FIELDS, write_header

log = logging.getLogger(__name__)


def run(
    params: Params, init: Path, out: Path, method: str | None = None, max_steps: int | None = None
) -> Path:
    """Train `method` (a results-table row) from `init` into the run folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if method and params.methods[method].miner is None:
        shutil.copyfile(init, out / "model.pt")
        write_header(out / "log.csv", LOG_FIELDS)
        log.info("%s is off-the-shelf: no training, %s copied", method, init)
        return out / "model.pt"
    from msvlad.training.trainer import train

    return train(params, init, out, max_steps=max_steps)
