"""Device choice, seeding and logging set-up shared by every command."""

from __future__ import annotations

import logging
import os
import random

import numpy as np


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821 - torch imported lazily
    """'auto' picks CUDA when present, else CPU; 'cuda' without a GPU is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device=cuda but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def setup_logging(level: int = logging.INFO) -> None:
    """One stderr handler with timestamps; called once by the CLI."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its AVX probing is noise
