"""What the network sees of the training images: decoded files, or the cached frozen trunk.

`TrainingInputs` gives the pool descriptors of a mining round (with the images that could not be
read, so the round drops them) and the inputs of a triplet for a training step, from the image
files or, with `train.frozen_stages > 0` on one process, from the `FrozenTrunkCache`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from msvlad.config import Params
from msvlad.data.images import ImageItem, ImageLoadError, load_batch
from msvlad.data.trainsets import TrainingSet
from msvlad.errors import InputError
from msvlad.evaluation.extract import describe_images
from msvlad.mining.pool import at_pool_precision, pool_autocast_fp16
from msvlad.nn.model import RetrievalNet
from msvlad.nn.trunk_cache import FrozenTrunkCache, TrunkStore

log = logging.getLogger(__name__)


class TrainingInputs:
    """Pool descriptors and triplet inputs of a training set for one model."""

    def __init__(
        self, model: RetrievalNet, train_set: TrainingSet, params: Params, device: torch.device
    ) -> None:
        self.model, self.train_set, self.params, self.device = model, train_set, params, device
        self.trunk: FrozenTrunkCache | None = None
        self.failures: dict[int, str] = {}  # the unreadable images of the last `describe`

    def cache_trunk(self, stages: int) -> None:
        """Compute the frozen trunk of every training image once (frozen stages only); fewer than
        two readable images is an input error naming the training set."""
        if stages and self.trunk is None:
            self.trunk = FrozenTrunkCache(
                self.model,
                stages,
                self.train_set.paths,
                image_size=self.params.model.image_size,
                batch_size=self.params.extract.batch_size,
                device=self.device,
                resize_filter=self.params.model.resize_filter,
                store=TrunkStore.default(),
            )
        ok = None if self.trunk is None else self.trunk.ok
        if ok is not None and ok.sum() < 2:
            raise InputError(
                f"{self.train_set.root}: {len(ok) - int(ok.sum())} of the "
                f"{len(ok)} training images could not be read"
            )

    def describe(
        self, pool_idx: np.ndarray, failures: dict[int, str] | None = None, progress: str = "pool"
    ) -> torch.Tensor:
        """Raw descriptors of the pool images; unreadable ones (positions) -> `failures`, which
        `self.failures` keeps until the next call (a round's error names one)."""
        precision, failures = self.params.miner.pool_precision, {} if failures is None else failures
        self.failures = failures
        if self.trunk is not None:
            bad = np.flatnonzero(~self.trunk.ok[pool_idx])
            failures.update({int(i): "unreadable when the trunk cache was built" for i in bad})
            return at_pool_precision(self.trunk.describe(pool_idx), precision)
        desc, _ = describe_images(
            self.model,
            [ImageItem(self.train_set.paths[i]) for i in pool_idx],
            image_size=self.params.model.image_size,
            batch_size=self.params.extract.batch_size,
            device=self.device,
            num_workers=self.params.base.num_workers,
            progress=progress,
            resize_filter=self.params.model.resize_filter,
            fp16=pool_autocast_fp16(precision),
            failures=failures,
        )
        return at_pool_precision(desc.to(self.device).float(), precision)

    def triplets(self, triplets: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The (3,) index rows of the triplets whose images load, and their `triplet` inputs."""
        loaded = [(t, x) for t in triplets if (x := self.triplet(t)) is not None]
        return [t for t, _ in loaded], [x for _, x in loaded]

    def triplet(self, triplet: torch.Tensor) -> torch.Tensor | None:
        """The three images (or cached trunk outputs) of one triplet; None if one is unreadable."""
        if self.trunk is not None:
            return self.trunk[triplet]
        items = [ImageItem(self.train_set.paths[i]) for i in triplet.tolist()]
        try:
            size, resize_filter = self.params.model.image_size, self.params.model.resize_filter
            return load_batch(items, size, "square", resize_filter=resize_filter)[0]
        except ImageLoadError as err:
            log.warning("skipping triplet: %s", err)
            return None
