"""Frozen-trunk cache: the output of the frozen leading backbone stages for every training image.

With `train.frozen_stages = s > 0` the first s stages never change, so their output is computed
once and every later forward (pool description, training step) starts from it. This makes the
mini profile's partial fine-tuning cheap; the paper fine-tunes everything (s = 0, no cache).

The cache can also be kept on disk (`store`, the trainer uses `trunk_store_dir()`): one file per
content key (the frozen stages' weights, the input size and filter, every image's path, size and
mtime), so the results-table rows that share a backbone compute it once. A file is only ever
reused for exactly that key, and a damaged one is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from msvlad.config import ResizeFilter
from msvlad.data.images import ImageItem, load_batch
from msvlad.errors import CheckpointError
from msvlad.nn.model import RetrievalNet
from msvlad.storage import load_torch, save_torch

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
        store: Path | None = None,
    ) -> None:
        self.model, self.stages, self.device, self.batch_size = model, stages, device, batch_size
        self.resize_filter = resize_filter
        self.ok = np.zeros(len(paths), dtype=bool)  # images that could be read
        file = None if store is None else store / f"{self.key(paths, image_size)}.pt"
        if file is not None and self._load(file, len(paths)):
            log.info("frozen-trunk cache: %d images from %s", len(paths), file)
            return
        self.features = self._build(paths, image_size)
        if file is not None:
            save_torch(file, {"features": self.features, "ok": torch.from_numpy(self.ok)})

    def key(self, paths: Sequence[Path], image_size: int) -> str:
        """Content key: the frozen stages' weights, the input, each image's path, size and mtime."""
        name = self.model.backbone.name
        h = hashlib.sha256(f"{name}|{self.stages}|{image_size}|{self.resize_filter}".encode())
        for stage in self.model.backbone.stages[: self.stages]:
            for name, tensor in stage.state_dict().items():
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        for path in paths:
            st = os.stat(path)
            h.update(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:32]

    def _load(self, file: Path, n: int) -> bool:
        """Reuse a stored cache of this key; False (rebuild) when absent or damaged."""
        if not file.is_file():
            return False
        try:
            state = load_torch(file)
            features, ok = state["features"], state["ok"].numpy()
        except (CheckpointError, KeyError, OSError, RuntimeError) as err:
            log.warning("frozen-trunk cache %s unusable (%s): rebuilt", file, err)
            return False
        if len(features) != n or len(ok) != n:
            return False
        self.features, self.ok = features, ok.astype(bool)
        return True

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


def trunk_store_dir() -> Path:
    """Where frozen-trunk caches are kept between runs: $MSVLAD_CACHE or ~/.cache/msvlad, /trunk."""
    root = (
        os.environ.get("MSVLAD_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msvlad"
    )
    return Path(root) / "trunk"
