"""Amortised mining: a bank of training-image descriptors, so a round re-embeds part of its pool.

The paper re-embeds the whole pool every mining round (`miner.refresh_fraction: 1.0`, the default
of both profiles). With a fraction f < 1, `DescriptorBank` keeps the raw descriptor of every
training image it has seen, stamped with the optimiser step of the weights that computed it, and a
round re-embeds only its pool images without a descriptor plus the oldest ones, up to ceil(f * P)
(ties by pool position); the others come from the bank. The training steps refresh the bank too:
the (a, p, n) descriptors their forward computes anyway are stored detached (one process only;
under torchrun each rank sees its own shard, so the banks would diverge). That forward runs in train
mode, but `RetrievalNet.train` keeps BatchNorm in eval mode and the backbones have no dropout, so it
is the eval-mode descriptor up to autocast and float summation order; it is rounded to the pool
precision (`msvlad.mining.pool.at_pool_precision`) and re-normalised in float32. The miner itself is
unchanged. Each descriptor's age (optimiser steps since its weights) goes to the logs.

With f = 1 every pool image is re-embedded in pool order, exactly the call of a run without a bank,
and the bank keeps nothing (it is never read), so the default costs no memory and no checkpoint
bytes. Memory is bounded: at most `BANK_BYTES` of float32 rows (and never fewer rows than the pool),
the oldest evicted first. The bank goes into the checkpoint, so a resumed run mines the same rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from msvlad.config import PoolPrecision
from msvlad.mining.pool import at_pool_precision
from msvlad.nn import functional as LF
from msvlad.training.logs import PoolDescriptors

BANK_BYTES = 2 << 30  # float32 rows kept at most (2 GiB: 16384 paper-profile descriptors)
NEVER = np.iinfo(np.int64).min  # stamp of an image without a descriptor: older than any other


class DescriptorBank:
    """Raw descriptors of training images with the step of the weights that computed them."""

    def __init__(
        self,
        num_images: int,
        fraction: float,
        min_rows: int,
        precision: PoolPrecision = "fp32",
        from_training: bool = True,
        max_bytes: int = BANK_BYTES,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"miner.refresh_fraction: {fraction!r} must be in [0, 1]")
        self.fraction, self.precision, self.from_training = (
            float(fraction),
            precision,
            from_training,
        )
        self.num_images, self.min_rows, self.max_bytes = num_images, min_rows, max_bytes
        self.slot = np.full(num_images, -1, dtype=np.int64)  # image -> row, -1: none
        self.ids = np.zeros(0, dtype=np.int64)  # row -> image, -1: free
        self.stamp = np.zeros(0, dtype=np.int64)  # row -> step of its weights
        self.desc: Tensor | None = None  # (rows, D) float32 on the CPU

    @property
    def keeps(self) -> bool:
        """Whether descriptors are kept (with f = 1 nothing is ever read from the bank)."""
        return self.fraction < 1.0

    def __len__(self) -> int:
        """Images with a descriptor."""
        return int((self.ids >= 0).sum())

    def to_refresh(self, pool_idx: np.ndarray) -> np.ndarray:
        """Pool positions to re-embed, ascending: those without a descriptor, then the oldest."""
        n = len(pool_idx)
        rows = self.slot[pool_idx]
        stamps = np.full(n, NEVER, dtype=np.int64)
        stamps[rows >= 0] = self.stamp[rows[rows >= 0]]
        want = max(math.ceil(self.fraction * n - 1e-9), int((rows < 0).sum()))
        if want >= n:
            return np.arange(n)
        return np.sort(np.argsort(stamps, kind="stable")[:want])

    def stamps(self, pool_idx: np.ndarray) -> np.ndarray:
        """Step stamps of images that have a descriptor."""
        return self.stamp[self.slot[pool_idx]]

    def get(self, pool_idx: np.ndarray) -> Tensor:
        """Descriptors (R, D) of images that have one."""
        assert self.desc is not None
        return self.desc[torch.from_numpy(self.slot[pool_idx])]

    def put(self, ids: Tensor | np.ndarray, desc: Tensor, step: int) -> None:
        """Store descriptors of images (the last one wins for a repeated image), stamped `step`."""
        if not self.keeps or len(ids) == 0:
            return
        ids = np.asarray(torch.as_tensor(ids).cpu(), dtype=np.int64).reshape(-1)
        last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]  # last occurrence of each
        ids, desc = ids[last], desc.detach().float().cpu()[torch.from_numpy(last)]
        if self.desc is None:
            self._allocate(desc.shape[1])
        rows = self.slot[ids]
        new = rows < 0
        rows[new] = self._free_rows(int(new.sum()), ids)
        self.ids[rows], self.stamp[rows], self.slot[ids] = ids, step, rows
        assert self.desc is not None
        self.desc[torch.from_numpy(rows)] = desc

    def put_training(self, ids: Tensor, desc: Tensor, step: int) -> None:
        """Store the (a, p, n) descriptors of a training forward: pool precision, float32 L2."""
        if self.keeps and self.from_training:
            desc = LF.l2n(desc.detach().float().reshape(-1, desc.shape[-1]))
            self.put(ids, at_pool_precision(desc, self.precision), step)

    def _allocate(self, dim: int) -> None:
        rows = min(self.num_images, max(self.min_rows, self.max_bytes // (4 * dim)))
        self.desc = torch.zeros(rows, dim)
        self.ids = np.full(rows, -1, dtype=np.int64)
        self.stamp = np.zeros(rows, dtype=np.int64)

    def _free_rows(self, count: int, keep: np.ndarray) -> np.ndarray:
        """`count` rows for new images: free ones, then the oldest images' (not those in `keep`)."""
        free = np.flatnonzero(self.ids < 0)[:count]
        if len(free) == count:
            return free
        used = np.flatnonzero((self.ids >= 0) & ~np.isin(self.ids, keep))
        oldest = used[np.lexsort((self.ids[used], self.stamp[used]))][: count - len(free)]
        if len(free) + len(oldest) < count:
            raise ValueError(f"descriptor bank: {count} new images exceed its {len(self.ids)} rows")
        self.slot[self.ids[oldest]] = -1
        return np.concatenate([free, oldest])

    def state_dict(self) -> dict[str, Any]:
        """The stored rows (tensors only: loadable with weights_only=True)."""
        used = np.flatnonzero(self.ids >= 0)
        desc = self.desc[torch.from_numpy(used)] if self.desc is not None else torch.zeros(0, 0)
        return {
            "ids": torch.tensor(self.ids[used].tolist(), dtype=torch.long),  # strides of 1, even
            "stamp": torch.tensor(self.stamp[used].tolist(), dtype=torch.long),  # when empty
            "desc": desc,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what `state_dict` returned, into rows in the same order (None: empty)."""
        self.slot[:] = -1
        self.desc, self.ids, self.stamp = None, np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids = np.zeros(0, np.int64) if state is None else state["ids"].cpu().numpy()
        if len(ids):
            assert state is not None
            self._allocate(state["desc"].shape[1])
            rows = np.arange(len(ids))
            self.ids[rows], self.stamp[rows] = ids, state["stamp"].cpu().numpy()
            self.slot[ids] = rows
            assert self.desc is not None
            self.desc[: len(ids)] = state["desc"].cpu().float()


def describe_pool(
    bank: DescriptorBank,
    describe: Callable[[np.ndarray, dict[int, str]], Tensor],
    pool_idx: np.ndarray,
    step: int,
    device: torch.device | str = "cpu",
) -> PoolDescriptors:
    """Embed the pool images the bank chooses (`describe(indices, failures)`), the rest from it.

    Unreadable images (positions in `failures`) are dropped from the round; the new descriptors go
    into the bank, stamped with `step`, after the round's pool was assembled. `device` is where
    the descriptors go when the bank serves the whole pool (`describe` decides otherwise).
    """
    refresh = bank.to_refresh(pool_idx)
    failures: dict[int, str] = {}
    if len(refresh):
        fresh = describe(pool_idx[refresh], failures)
    else:  # refresh fraction 0 and every image banked: nothing to embed
        fresh = bank.get(pool_idx[:0]).to(device)
    if len(refresh) == len(pool_idx):
        desc, ages = fresh, np.zeros(len(pool_idx), dtype=np.int64)
    else:
        kept = np.setdiff1d(np.arange(len(pool_idx)), refresh)
        desc = torch.empty(len(pool_idx), fresh.shape[1], dtype=fresh.dtype, device=fresh.device)
        desc[torch.from_numpy(refresh).to(fresh.device)] = fresh
        desc[torch.from_numpy(kept).to(fresh.device)] = bank.get(pool_idx[kept]).to(desc)
        ages = np.zeros(len(pool_idx), dtype=np.int64)
        ages[kept] = step - bank.stamps(pool_idx[kept])
    if bank.keeps:
        ok = np.setdiff1d(np.arange(len(refresh)), list(failures))
        bank.put(pool_idx[refresh[ok]], fresh[torch.from_numpy(ok).to(fresh.device)], step)
    if failures:
        keep = np.setdiff1d(np.arange(len(pool_idx)), refresh[list(failures)])
        pool_idx, ages = pool_idx[keep], ages[keep]
        desc = desc[torch.from_numpy(keep).to(desc.device)]
    return PoolDescriptors(pool_idx, desc, ages, len(refresh), len(failures))
