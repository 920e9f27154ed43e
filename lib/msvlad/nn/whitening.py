"""PCA-whitening learned from descriptors (plain PCA-w as in the paper; power 0.5 = full)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from msvlad.nn import functional as LF


class Whitening(nn.Module):
    """Apply (x - mean) @ projection then L2; buffers travel with the checkpoint."""

    def __init__(self, mean: Tensor, projection: Tensor, eigenvalues: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("projection", projection.float())
        ev = eigenvalues if eigenvalues is not None else torch.ones(projection.shape[1])
        self.register_buffer("eigenvalues", ev.float())

    @property
    def in_dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.projection.shape[1])

    @classmethod
    def fit(cls, descriptors: Tensor, dim: int | None = None, power: float = 0.5) -> Whitening:
        """Learn from training descriptors (N, D)."""
        return cls(*LF.fit_pca_whitening(descriptors, dim, power))

    def forward(self, x: Tensor) -> Tensor:
        return LF.pca_whiten(x, self.mean, self.projection)

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim}"
