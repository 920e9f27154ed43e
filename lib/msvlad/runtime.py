"""Device choice, seeding and logging set-up shared by every command."""

from __future__ import annotations

import atexit
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


def code_version() -> dict[str, str]:
    """msvlad's version and a SHA-256 of its package sources (content, not a git state).

    Recorded in run.json and evaluation manifests, which DVC hashes: the same sources give the
    same record on every machine and clone, whatever the git state around them.
    """
    from msvlad import __version__

    return {"version": __version__, "sources": sources_digest()}


def sources_digest(root: str | os.PathLike | None = None) -> str:
    """SHA-256 over every source and data file of the msvlad package (path and bytes, sorted)."""
    import hashlib
    from pathlib import Path

    root = Path(root) if root is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and _is_source(p)):
        rel = path.relative_to(root).as_posix()
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _is_source(path: os.PathLike) -> bool:
    """A file the package is made of (bytecode caches and editor leftovers are not)."""
    from pathlib import PurePath

    p = PurePath(path)
    return "__pycache__" not in p.parts and p.suffix in (".py", ".csv")


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


# glibc mallopt parameters (malloc.h): freed memory stays in the heap for the next batch
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_TRIM_THRESHOLD = 2**31 - 1  # an int: the largest value mallopt takes
_TOP_PAD = 256 << 20
ALLOCATOR_ENV = "MSVLAD_MALLOC"  # "system": leave the C allocator's defaults alone


def tune_allocator() -> bool:
    """Keep freed tensor memory in the heap (glibc): no page fault storm on every CPU batch.

    By default glibc serves each allocation above a threshold with a fresh mmap and gives it back
    on free, so every activation map of every batch is new memory the kernel must fault in and
    zero: a CPU forward pass of a small CNN then spends about as long in the kernel as in the
    arithmetic (benchmarks/bench_allocator.py). With mmap off and trimming at its maximum, freed
    blocks are reused; the values computed are the same (allocation never changes arithmetic).
    Returns whether the settings were applied: False off glibc, or with MSVLAD_MALLOC=system.
    """
    if os.environ.get(ALLOCATOR_ENV, "").lower() == "system":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)


@dataclass
class Dist:
    """Process-group facts (a single process when not launched by torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _leave_process_group() -> None:
    """Destroy this process's group, if it is still there (registered at exit by torchrun ranks)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # leave the group before the interpreter exits: a rank that exits with gloo's threads
        # still joinable is aborted ("terminate called without an active exception", SIGABRT)
        atexit.register(_leave_process_group)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return Dist(rank, dist.get_world_size())
