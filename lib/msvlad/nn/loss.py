"""Triplet loss on squared distances of L2-normalised descriptors (margin 0.1 in the paper)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 0.1) -> Tensor:
    """Mean over triplets of max(0, |a - p|^2 - |a - n|^2 + margin); inputs (T, D)."""
    d_ap = (anchor - positive).pow(2).sum(dim=1)
    d_an = (anchor - negative).pow(2).sum(dim=1)
    return torch.clamp(d_ap - d_an + margin, min=0).mean()


class TripletLoss(nn.Module):
    """Module form of `triplet_loss`."""

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        return triplet_loss(anchor, positive, negative, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
