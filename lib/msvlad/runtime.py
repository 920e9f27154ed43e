"""Device choice, seeding and logging set-up shared by every command."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import numpy as np


def resolve_device(name: str = "auto") -> torch.device:  # noqa: F821 - torch imported lazily
    """'auto' picks CUDA when present, else CPU; 'cuda' without a GPU is a clear error."""
    import torch

    from msvlad.errors import InputError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"base.device: {name!r} is not a device (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"base.device: {name} asked, but no CUDA device is available on this machine "
            "(use auto or cpu)"
        )
    return device


def code_version() -> dict[str, str | None]:
    """msvlad's version and, in a git checkout, its commit (+ "dirty" if tracked files changed)."""
    import subprocess
    from pathlib import Path

    from msvlad import __version__

    out: dict[str, str | None] = {"version": __version__, "commit": None}
    try:
        git = ["git", "-C", str(Path(__file__).resolve().parent)]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            changed = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            out["commit"] = commit.stdout.strip() + (" dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def setup_logging(level: int = logging.INFO) -> None:
    """One stderr handler with timestamps; called once by the CLI."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its AVX probing is noise


@dataclass
class Dist:
    """Process-group facts (a single process when not launched by torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return Dist(rank, dist.get_world_size())
