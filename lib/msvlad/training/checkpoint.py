"""What a training checkpoint holds besides weights: RNG states, the run's signature, a stop flag.

A checkpoint (`checkpoint.pt`) stores the model, Adam, step, mining round, the round's remaining
triplets, the miner's state, the epoch accumulators and every RNG, so a killed run resumes to the
same weights as an uninterrupted one. `run_signature` names the parameters a resume must share.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors (loadable with weights_only)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"]).astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_signature(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters a checkpoint must share with the run resuming it (the step budget may grow)."""
    sig = {k: params.get(k) for k in ("model", "miner", "train", "data")}
    sig["seed"] = params.get("base", {}).get("seed")
    if isinstance(sig["train"], dict):
        sig["train"] = {
            k: v
            for k, v in sig["train"].items()
            if k not in ("epochs", "checkpoint_every", "val_every")
        }
    return sig


class StopRequest:
    """Turns SIGTERM/SIGINT into a graceful stop at the next step boundary (checkpoint first)."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Install the handlers for the duration of the block (main thread only)."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: Any) -> None:
            log.warning("signal %d: stopping after this step and writing a checkpoint", signum)
            self.requested = True

        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
