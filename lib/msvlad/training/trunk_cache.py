"""Frozen-trunk cache: the output of the frozen leading backbone stages for every training image.

With `train.frozen_stages = s > 0` the first s stages never change, so their output is computed
once and every later forward (pool description, training step) starts from it. This makes the
mini profile's partial fine-tuning cheap; the paper fine-tunes everything (s = 0, no cache).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from msvlad.config import ResizeFilter
from msvlad.data.images import ImageItem, load_batch
from msvlad.nn.model import RetrievalNet

log = logging.getLogger(__name__)


class FrozenTrunkCache:
    """Per-image outputs of the first `stages` backbone stages, at the training resolution."""

    def __init__(
        self,
        model: RetrievalNet,
        stages: int,
        paths: Sequence[Path],
        *,
        image_size: int,
        batch_size: int,
        device: torch.device,
        resize_filter: ResizeFilter = "bilinear",
    ) -> None:
        self.model, self.stages, self.device, self.batch_size = model, stages, device, batch_size
        self.resize_filter = resize_filter
        self.ok = np.zeros(len(paths), dtype=bool)  # images that could be read
        self.features = self._build(paths, image_size)

    @torch.no_grad()
    def _build(self, paths: Sequence[Path], size: int) -> torch.Tensor:
        self.model.eval()
        chunks = []
        bs = self.batch_size
        for start in tqdm(range(0, len(paths), bs), desc="train: frozen-trunk cache", leave=False):
            items = [ImageItem(p) for p in paths[start : start + bs]]
            batch, ok = load_batch(items, size, "square", "zero", self.resize_filter)
            self.ok[start : start + bs] = ok
            trunk = self.model.backbone.trunk(batch.to(self.device), self.stages)
            chunks.append(trunk.cpu())
        features = torch.cat(chunks)
        log.debug(
            "frozen-trunk cache: %d images, %s each, %.0f MB",
            len(features),
            tuple(features.shape[1:]),
            features.numel() * 4 / 2**20,
        )
        return features

    def __getitem__(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Cached trunk outputs of the images at `index`."""
        return self.features[index]

    @torch.no_grad()
    def describe(self, index: np.ndarray) -> torch.Tensor:
        """Raw descriptors (N, raw_dim) of the images at `index`, from their cached trunk."""
        self.model.eval()
        bs = self.batch_size
        out = [
            self.model.forward_from(
                self.features[index[i : i + bs]].to(self.device), self.stages
            ).float()
            for i in range(0, len(index), bs)
        ]
        return torch.cat(out)
