"""The paper's difficulty miner (Vaccaro et al., MVA 2022; docs/method.md, "Mining")."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from msvlad.config import MinerConfig
from msvlad.mining.base import (
    MinedTriplets,
    TripletMiner,
    build_record,
    predicted_loss,
    setting,
)
from msvlad.mining.neighbors import topk_neighbors


class DifficultyMiner(TripletMiner):
    """The paper's miner: nearest negative, rank-adjacent positive, predicted loss in m +- delta.

    Per anchor a, walking its ranked list (self excluded, 0-based ranks):
    - the negative n is the first-ranked image of another class, at rank r_n (all images ranked
      before it are positives);
    - semi-hard, with probability `semi_hard_prob` when r_n >= 1 (a positive sits just above n):
      p is the positive at rank r_n - 1; otherwise hard: p is the first positive ranked after r_n;
    - a hard positive must satisfy r_p - r_n < threshold, else the anchor is dropped;
    - keep iff (m - delta) < L < (m + delta), L = m + d2(a, p) - d2(a, n);
    - at most one triplet per anchor; then, in a random anchor order, the first triplet of each
      anchor class, capped at `triplets_per_round`.
    Randomness per round, drawn from the miner's generator in this order: `torch.rand(N) <
    semi_hard_prob` (one coin per anchor, used only where r_n >= 1), then `torch.randperm(N)`.
    """

    name: ClassVar[str] = "difficulty"

    def __init__(
        self,
        *,
        delta: float = MinerConfig.delta,
        threshold: int = MinerConfig.threshold,
        semi_hard_prob: float = MinerConfig.semi_hard_prob,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.delta: float = setting("delta", delta)
        self.threshold: int = setting("threshold", threshold)
        self.semi_hard_prob: float = setting("semi_hard_prob", semi_hard_prob)

    def _mine(self, desc: Tensor, labels: Tensor) -> MinedTriplets:
        n = desc.shape[0]
        coins = (torch.rand(n, generator=self._generator) < self.semi_hard_prob).to(desc.device)
        order = torch.randperm(n, generator=self._generator).to(desc.device)
        # Why k = c_max + threshold + 1 gives the same triplets as walking the full sorted list:
        # an anchor has at most c_max - 1 positives besides itself, so if its list holds any
        # negative, the first one is at rank r_n <= c_max - 1 < k. The semi-hard positive is at
        # r_n - 1 < k. A hard positive must satisfy r_p - r_n < threshold, so r_p <= r_n +
        # threshold - 1 <= c_max + threshold - 2 < k. Every rank the walk can look at is therefore
        # in the top k; ranks >= k could only hold positives that fail the gap rule. (If k is
        # clamped to N - 1, the list is the full list.) The tight bound is c_max + threshold - 1.
        c_max = int(torch.unique(labels, return_counts=True)[1].max())
        k = min(n - 1, c_max + self.threshold + 1)
        sims, idx = topk_neighbors(
            desc, k, exclude_self=True, backend=self.backend, chunk_size=self.chunk_size
        )
        cand = difficulty_candidates(
            sims, idx, labels, coins, margin=self.margin, delta=self.delta, threshold=self.threshold
        )
        chosen = first_per_class(order, cand["keep"], labels, self.triplets_per_round)
        kinds = tuple("semi-hard" if s else "hard" for s in cand["semi"][chosen].tolist())
        return build_record(
            anchors=chosen,
            positives=cand["p_idx"][chosen],
            negatives=cand["n_idx"][chosen],
            labels=labels,
            pos_ranks=cand["r_p"][chosen],
            neg_ranks=cand["r_n"][chosen],
            pos_sims=cand["s_p"][chosen],
            neg_sims=cand["s_n"][chosen],
            margin=self.margin,
            kinds=kinds,
            considered=n,
            with_candidate=int(cand["keep"].sum()),
        )


def difficulty_candidates(
    sims: Tensor,
    idx: Tensor,
    labels: Tensor,
    coins: Tensor,
    *,
    margin: float,
    delta: float,
    threshold: int,
    anchor_labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-anchor candidate of the difficulty rule, vectorised over ranked lists (A, k).

    `sims`/`idx` are each anchor's ranked list without the anchor (from `topk_neighbors`), `idx`
    indexing the pool whose labels are `labels`; row i is anchor i unless `anchor_labels` (A,)
    gives the rows' labels (a block of anchors). `coins` (A,) bool are the semi-hard draws.
    Returns (A,) tensors: keep, semi, r_p, r_n, p_idx, n_idx, s_p, s_n, loss (entries of anchors
    with keep=False are meaningless).
    """
    k = idx.shape[1]
    ranks = torch.arange(k, device=idx.device)
    own = labels if anchor_labels is None else anchor_labels
    is_pos = labels[idx] == own[:, None]  # (A, k)
    r_n = _leading_false(~is_pos)  # first negative; k if none
    has_neg = r_n < k
    after = is_pos & (ranks[None, :] > r_n[:, None])  # positives ranked below the negative
    r_h = _leading_false(after)
    has_hard = r_h < k
    semi = coins & has_neg & (r_n >= 1)
    valid = has_neg & (semi | (has_hard & (r_h - r_n < threshold)))
    r_p = torch.where(semi, r_n - 1, r_h).clamp(0, k - 1)
    r_n = r_n.clamp(0, k - 1)
    s_p = sims.gather(1, r_p[:, None]).squeeze(1)
    s_n = sims.gather(1, r_n[:, None]).squeeze(1)
    loss = predicted_loss(s_p, s_n, margin)
    keep = valid & (loss > margin - delta) & (loss < margin + delta)
    return {
        "keep": keep,
        "semi": semi,
        "r_p": r_p,
        "r_n": r_n,
        "p_idx": idx.gather(1, r_p[:, None]).squeeze(1),
        "n_idx": idx.gather(1, r_n[:, None]).squeeze(1),
        "s_p": s_p,
        "s_n": s_n,
        "loss": loss,
    }


def first_per_class(order: Tensor, keep: Tensor, labels: Tensor, cap: int) -> Tensor:
    """Anchors with keep=True taken in `order`, the first one of each label, at most `cap`."""
    ordered = order[keep[order]]
    if ordered.numel() == 0:
        return ordered
    _, inverse = torch.unique(labels[ordered], return_inverse=True)
    positions = torch.arange(ordered.numel(), device=ordered.device)
    first = torch.full((int(inverse.max()) + 1,), ordered.numel(), device=ordered.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return ordered[first.sort().values[:cap]]


def _leading_false(mask: Tensor) -> Tensor:
    """Index of the first True in each row of (N, k) `mask`, k where there is none."""
    return (mask.cumsum(1) == 0).sum(1)
