"""Class-balanced mining pools: each round draws classes, then a few images per class.

Vaccaro et al., MVA 2022 (docs/method.md, "Mining"): a mining round samples P // I landmark classes,
up to I random images of each, shuffles them and truncates to the pool size P (paper: P = 8000,
I = 15). `classes` chooses which classes can be drawn: "with_positives", only those with at least
two images (only they can give an anchor a positive), or "all", every class folder, as the authors'
code does, so single-image classes enter pools as negatives for the others. The draw depends on
(seed, round_index) alone, so a resumed run re-draws the same pools.

`draw` says how consecutive pools relate: "independent" (the paper's), every round a fresh draw;
"rolling" (our extension for amortised mining, docs/method.md), the pool of round r is that of
round r - 1 with its oldest ceil(turnover * G) classes (G classes per pool) replaced by classes it
does not hold, so the descriptor bank holds the rest of the pool at any training-set size (with
independent draws from GLDv2-clean's 81k classes a pool shares about 1 % of its images with the
bank). Rolling pools are replayed from round 0, so they too depend on (seed, round_index) alone.

`pool_precision` sets the numeric precision of the pool descriptors the miner sees
(`miner.pool_precision`): "fp32" everywhere (the authors'), "fp16" (float16 autocast on CUDA,
and the descriptors rounded to float16 on every device, so a CPU run measures what float16 mining
changes), or "auto" (float16 autocast on CUDA, float32 on the CPU).
"""

from __future__ import annotations

import logging
import math
from typing import get_args

import numpy as np
import torch
from torch import Tensor

from msvlad.config import (
    PoolClasses,
    PoolDraw,
    PoolPrecision,
    check_pool_draw,
    check_pool_shape,
    check_value,
)
from msvlad.nn import functional as LF

log = logging.getLogger(__name__)

POOL_PRECISIONS: tuple[str, ...] = get_args(PoolPrecision)
POOL_CLASSES: tuple[str, ...] = get_args(PoolClasses)
POOL_DRAWS: tuple[str, ...] = get_args(PoolDraw)


def pool_autocast_fp16(precision: PoolPrecision) -> bool:
    """Whether the pool is described under float16 autocast (which only acts on CUDA)."""
    check_value("miner.pool_precision", precision)
    return precision != "fp32"


def at_pool_precision(desc: Tensor, precision: PoolPrecision) -> Tensor:
    """Pool descriptors as the miner sees them: "fp16" rounds to float16 and re-normalises."""
    check_value("miner.pool_precision", precision)
    if precision != "fp16":
        return desc
    return LF.l2n(desc.to(torch.float16).to(desc.dtype))


class ClassBalancedPool:
    """Draws the pool of training-image indices for each mining round, class-balanced and seeded."""

    def __init__(
        self,
        labels: np.ndarray,
        pool_size: int,
        images_per_class: int,
        seed: int,
        classes: PoolClasses = "with_positives",
        draw: PoolDraw = "independent",
        turnover: float = 1.0,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels: expected a non-empty 1-D integer array, got {labels.dtype} {labels.shape}"
            )
        pool_size = check_value("miner.pool_size", pool_size)
        images_per_class = check_value("miner.images_per_class", images_per_class)
        seed = check_value("base.seed", seed)
        check_pool_shape(pool_size, images_per_class)
        check_value("miner.pool_classes", classes)
        check_value("miner.pool_draw", draw)
        turnover = check_value("miner.refresh_fraction", turnover)
        check_pool_draw(draw, turnover)
        names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        with_positives = np.flatnonzero(counts >= 2)
        if with_positives.size < 2:
            raise ValueError(
                f"labels: need at least 2 classes with >= 2 images, found {with_positives.size} "
                f"(of {names.size} classes)"
            )
        usable = with_positives if classes == "with_positives" else np.arange(names.size)
        order = np.argsort(inverse, kind="stable")  # image indices grouped by class, ascending
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._members = [order[starts[c] : starts[c] + counts[c]] for c in usable]
        self.labels = labels
        self.classes = names[usable]  # labels that can be drawn
        self.class_rule = classes
        self.pool_size = int(pool_size)
        self.images_per_class = int(images_per_class)
        self.seed = int(seed)
        self.classes_per_pool = min(self.pool_size // self.images_per_class, usable.size)
        self.draw, self.turnover = draw, float(turnover)
        self._rolled: tuple[int, list[tuple[int, np.ndarray]]] | None = None  # last rolling pool
        log.debug("ClassBalancedPool: %d usable of %d classes", usable.size, names.size)

    def sample(self, round_index: int) -> np.ndarray:
        """Pool indices (int64) into `labels` for one round; same (seed, round_index), same pool."""
        if (
            not isinstance(round_index, int | np.integer)
            or isinstance(round_index, bool)
            or round_index < 0
        ):
            raise ValueError(f"round_index: must be an int >= 0, got {round_index!r}")
        if self.draw == "rolling":
            return np.concatenate([imgs for _, imgs in self._rolling(int(round_index))])
        rng = np.random.default_rng([self.seed, int(round_index)])
        pool = np.concatenate([imgs for _, imgs in self._draw(rng)])
        rng.shuffle(pool)
        return pool[: self.pool_size]

    def _draw(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
        """A fresh pool: classes_per_pool usable classes, each with its (class, images) group."""
        picked = rng.choice(len(self._members), size=self.classes_per_pool, replace=False)
        return [(int(c), self._images(c, rng)) for c in picked]

    def _images(self, c: int, rng: np.random.Generator) -> np.ndarray:
        """Up to images_per_class random images of usable class `c`."""
        members = self._members[c]
        take = min(self.images_per_class, members.size)
        return rng.choice(members, size=take, replace=False).astype(np.int64)

    def _rolling(self, round_index: int) -> list[tuple[int, np.ndarray]]:
        """The (class, images) groups of a rolling pool, oldest first, replayed from round 0."""
        if self._rolled is not None and self._rolled[0] <= round_index:
            r, groups = self._rolled
        else:  # round 0 draws the classes and images of the first independent round
            r, groups = 0, self._draw(np.random.default_rng([self.seed, 0]))
        replace = math.ceil(self.turnover * len(groups) - 1e-9)
        while r < round_index:
            r += 1
            rng = np.random.default_rng([self.seed, r])
            kept = groups[replace:]
            held = np.array([c for c, _ in kept], dtype=np.int64)
            free = np.setdiff1d(np.arange(len(self._members)), held)  # the dropped ones included
            picked = rng.choice(free, size=min(replace, free.size), replace=False)
            groups = kept + [(int(c), self._images(c, rng)) for c in picked]
        self._rolled = (r, groups)
        return groups

    def __repr__(self) -> str:
        return (
            f"ClassBalancedPool(pool_size={self.pool_size}, "
            f"images_per_class={self.images_per_class}, classes_per_pool={self.classes_per_pool}, "
            f"usable_classes={self.classes.size}, classes={self.class_rule!r}, draw={self.draw!r}, "
            f"turnover={self.turnover}, seed={self.seed})"
        )
