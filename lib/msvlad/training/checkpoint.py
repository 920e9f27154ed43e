"""What a training checkpoint holds besides weights: progress, RNG states, the run's signature.

A checkpoint (`checkpoint.pt`) stores the model, Adam, the miner's state, the run's progress
(`RunProgress`: step, mining round, the round's remaining triplets, the epoch accumulators) and
every RNG, so a killed run resumes to the same weights as an uninterrupted one.
`run_signature` names the parameters a resume must share, `signature_diff` lists how two differ.
`StopRequest` turns SIGTERM/SIGINT into a checkpoint and a stop; `fault_point` is where tests make
a run die (`MSVLAD_FAULT`), to prove that every interruption resumes exactly.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from msvlad.config import Params, params_to_dict
from msvlad.errors import Interrupted

if TYPE_CHECKING:
    from msvlad.mining.base import TripletMiner
    from msvlad.training.bank import DescriptorBank

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


# data keys a training run does not depend on: a run resumes after a change of mirror or of the
# test sets evaluated afterwards (downloads are checked by checksum, not by where they came from)
DATA_NOT_IN_RUN = ("mirror", "test_sets", "assets")


def run_signature(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters a checkpoint must share with the run resuming it (the step budget may grow).

    A key added to a section after a run was recorded takes its default there: the config's
    defaults are the behaviour from before the key existed.
    """
    defaults = params_to_dict(Params())
    sig: dict[str, Any] = {}
    for section in ("model", "miner", "train", "data"):
        value = params.get(section)
        sig[section] = {**defaults[section], **value} if isinstance(value, dict) else value
    sig["seed"] = params.get("base", {}).get("seed")
    if isinstance(sig["train"], dict):
        sig["train"] = {
            k: v
            for k, v in sig["train"].items()
            if k not in ("epochs", "checkpoint_every", "val_every")
        }
    if isinstance(sig["data"], dict):  # where files come from and what is tested later
        sig["data"] = {k: v for k, v in sig["data"].items() if k not in DATA_NOT_IN_RUN}
    return sig


def signature_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs between two signatures."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += signature_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


@dataclass
class RunProgress:
    """Where a run stands: optimiser step, next mining round, the round's triplets, the epoch."""

    step: int = 0
    round: int = 0  # the next round to mine
    round_pos: int = 0  # triplets of the current round already used
    round_triplets: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, 3, dtype=torch.long)
    )
    epoch_loss: list[float] = field(default_factory=list)
    epoch_triplets: int = 0
    epoch_rounds: list[tuple[int, int]] = field(default_factory=list)  # (round, triplets mined)

    @property
    def round_done(self) -> bool:
        """Every triplet of the current round has been used (time to mine the next)."""
        return self.round_pos >= len(self.round_triplets)

    def next_batch(self, size: int) -> torch.Tensor:
        """The next `size` triplets of the round (fewer at its end)."""
        batch = self.round_triplets[self.round_pos : self.round_pos + size]
        self.round_pos += len(batch)
        return batch

    def new_round(self, triplets: torch.Tensor) -> None:
        """Start using a freshly mined round."""
        self.epoch_rounds.append((self.round, len(triplets)))
        self.round_triplets, self.round_pos = triplets, 0
        self.round += 1

    def end_epoch(self) -> None:
        """Reset the epoch accumulators after the epoch's log row."""
        self.epoch_loss, self.epoch_triplets, self.epoch_rounds = [], 0, []

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only (loadable with weights_only=True)."""
        return {
            "step": self.step,
            "round": self.round,
            "round_triplets": self.round_triplets,
            "round_pos": self.round_pos,
            "epoch_loss": torch.tensor(self.epoch_loss, dtype=torch.float64),
            "epoch_triplets": self.epoch_triplets,
            "epoch_rounds": torch.tensor(self.epoch_rounds, dtype=torch.long).reshape(-1, 2),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (the keys may sit in a larger checkpoint dict)."""
        self.step, self.round = int(state["step"]), int(state["round"])
        self.round_triplets = state["round_triplets"].cpu()
        self.round_pos = int(state["round_pos"])
        self.epoch_loss = state["epoch_loss"].tolist()
        self.epoch_triplets = int(state["epoch_triplets"])
        self.epoch_rounds = [(int(r), int(n)) for r, n in state["epoch_rounds"].tolist()]


def training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    miner: TripletMiner,
    bank: DescriptorBank,
    progress: RunProgress,
    params: Params,
) -> dict[str, Any]:
    """Everything a resume needs (tensors and plain containers: weights_only loadable)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "miner": miner.state_dict(),
        "bank": bank.state_dict(),
        **progress.state_dict(),
        "rng": rng_state(),
        "params": params_to_dict(params),
    }


def restore_training_state(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    miner: TripletMiner,
    bank: DescriptorBank,
    progress: RunProgress,
) -> None:
    """Restore what `training_state` returned: weights, optimiser, miner, bank, progress, RNGs."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    miner.load_state_dict(state["miner"])
    bank.load_state_dict(state.get("bank"))  # none before the bank: a full refresh
    progress.load_state_dict(state)
    set_rng_state({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state["rng"].items()})


FAULT_ENV = "MSVLAD_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: `MSVLAD_FAULT=<name>[:<n>[:<SIGNAL>]]` sends SIGNAL (KILL) at the n-th pass here.

    The named points are where an interruption could lose or duplicate work (see
    `msvlad.training.trainer`); with the variable unset this is one dictionary lookup.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or spec.split(":")[0] != name:
        return
    parts = spec.split(":")
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == (int(parts[1]) if len(parts) > 1 else 1):
        os.kill(os.getpid(), getattr(signal, "SIG" + (parts[2] if len(parts) > 2 else "KILL")))


class StopRequest:
    """Turns SIGTERM/SIGINT into a graceful stop at the next step boundary (checkpoint first)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = 0

    def raise_if_requested(self, where: str) -> None:
        """After the checkpoint: `Interrupted` (exit 128 + signal) if a signal asked to stop."""
        if self.requested:
            raise Interrupted(
                self.signum,
                f"{where}: stopped by signal {self.signum}; checkpoint written, rerun the same "
                "command to resume",
            )

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Install the handlers for the duration of the block (main thread only)."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: Any) -> None:
            log.warning("signal %d: stopping after this step and writing a checkpoint", signum)
            self.requested, self.signum = True, signum

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
