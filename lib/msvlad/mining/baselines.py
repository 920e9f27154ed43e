"""Baseline miners: random, hardest negative (cirtorch), semi-hard (FaceNet), batch-hard.

All four draw anchors in a seeded random order and keep at most one triplet per anchor class and
`triplets_per_round` triplets, like the paper's miner; they differ only in how an anchor's positive
and negative are chosen (each class docstring says exactly how).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from msvlad.mining.base import MinedTriplets, TripletMiner, build_record, squared_distance
from msvlad.mining.neighbors import similarity_rows

_ROW_BYTES = 1 << 27  # float64 similarity rows computed at once by the baseline miners


@dataclass
class _Round:
    """Per-round context handed to a baseline's per-anchor rule."""

    labels: Tensor  # (N,) on the descriptors' device
    class_ids: Tensor  # (N,) labels mapped to 0..C-1
    u_pos: Tensor  # (N,) uniform draws for a random positive
    u_neg: Tensor  # (N,) uniform draws for a random negative
    margin: float


class _PerAnchorMiner(TripletMiner):
    """Baselines: anchors in random order, one rule per anchor, first triplet per class, capped.

    Randomness per round, in this order: `torch.randperm(N)` (anchor order), `torch.rand(N)` (random
    positive draws), `torch.rand(N)` (random negative draws). Anchors of classes that already have a
    triplet are skipped, so only the anchors needed are scored (`considered` counts them).
    """

    kind: ClassVar[str] = ""
    needs_rows: ClassVar[bool] = True

    def _mine(self, desc: Tensor, labels: Tensor) -> MinedTriplets:
        n, dev = desc.shape[0], desc.device
        order = torch.randperm(n, generator=self._generator).to(dev)
        u_pos = torch.rand(n, generator=self._generator, dtype=torch.float64).to(dev)
        u_neg = torch.rand(n, generator=self._generator, dtype=torch.float64).to(dev)
        _, class_ids = torch.unique(labels, return_inverse=True)
        num_classes = int(class_ids.max()) + 1
        ctx = _Round(labels, class_ids, u_pos, u_neg, self.margin)
        filled = torch.zeros(num_classes, dtype=torch.bool, device=dev)
        block = max(16, min(1024, _ROW_BYTES // (8 * n)))
        chosen: list[tuple[int, int, int]] = []
        considered = 0
        for start in range(0, n, block):
            anchors = order[start : start + block]
            anchors = anchors[~filled[class_ids[anchors]]]
            if anchors.numel() == 0:
                continue
            rows = similarity_rows(desc, anchors, exclude_self=True) if self.needs_rows else None
            for i, a in enumerate(anchors.tolist()):
                if filled[class_ids[a]]:
                    continue
                considered += 1
                pick = self._select(a, rows[i] if rows is not None else None, ctx)
                if pick is None:
                    continue
                chosen.append((a, *pick))
                filled[class_ids[a]] = True
                if len(chosen) == self.triplets_per_round:
                    break
            if len(chosen) == self.triplets_per_round:
                break
        trip = torch.tensor(chosen, dtype=torch.long, device=dev).reshape(-1, 3)
        a_idx, p_idx, n_idx = trip.unbind(1)
        rows = similarity_rows(desc, a_idx, exclude_self=True)  # (T, N) for the record
        return build_record(
            anchors=a_idx,
            positives=p_idx,
            negatives=n_idx,
            labels=labels,
            pos_ranks=_rank_in_row(rows, p_idx),
            neg_ranks=_rank_in_row(rows, n_idx),
            pos_sims=rows.gather(1, p_idx[:, None]).squeeze(1),
            neg_sims=rows.gather(1, n_idx[:, None]).squeeze(1),
            margin=self.margin,
            kinds=(self.kind,) * len(chosen),
            considered=considered,
            with_candidate=len(chosen),
        )

    def _select(self, a: int, row: Tensor | None, ctx: _Round) -> tuple[int, int] | None:
        raise NotImplementedError


class RandomMiner(_PerAnchorMiner):
    """Baseline: a uniformly random positive and a uniformly random negative of the anchor.

    Positive: uniform among the other images of the anchor's class; negative: uniform among the
    images of every other class (both from the round's pre-drawn uniforms).
    """

    name: ClassVar[str] = "random"
    kind: ClassVar[str] = "random"
    needs_rows: ClassVar[bool] = False

    def _select(self, a: int, row: Tensor | None, ctx: _Round) -> tuple[int, int] | None:
        pos, neg = _positives_negatives(a, ctx)
        if pos.numel() == 0 or neg.numel() == 0:
            return None
        return _draw(pos, ctx.u_pos[a]), _draw(neg, ctx.u_neg[a])


class HardestNegativeMiner(_PerAnchorMiner):
    """Baseline after cirtorch's `create_epoch_tuples`: a random positive, the nearest negative.

    cirtorch gives each query its `nnum` nearest pool images of other classes, walking the query's
    ranked list and skipping an image whose class already gave one of that query's negatives (one
    image per class among one query's negatives; nothing is excluded across queries). Here every
    triplet has one negative and a round keeps one triplet per anchor class, as for the paper's
    miner, so nnum = 1: the negative is the anchor's nearest pool image of another class (the
    lowest index among equal similarities), whatever other anchors of the round chose. The positive
    is drawn uniformly among the other images of the anchor's class: cirtorch does not mine
    positives (it uses the query's matching image from the SfM ground truth).
    """

    name: ClassVar[str] = "hardest_negative"
    kind: ClassVar[str] = "hardest-negative"

    def _select(self, a: int, row: Tensor | None, ctx: _Round) -> tuple[int, int] | None:
        assert row is not None
        pos, _ = _positives_negatives(a, ctx)
        other = ctx.labels != ctx.labels[a]
        if pos.numel() == 0 or not bool(other.any()):
            return None
        n = int(torch.where(other, row, -math.inf).argmax())  # first index among equal maxima
        return _draw(pos, ctx.u_pos[a]), n


class SemiHardMiner(_PerAnchorMiner):
    """Baseline after FaceNet / PML "semihard": d2(a,p) < d2(a,n) < d2(a,p) + m, i.e. 0 < L < m.

    The positive is random; the negative is the nearest one farther than the positive (the
    hardest semi-hard negative, as in TF's triplet_semihard_loss); the anchor is dropped if that
    negative is not within the margin.
    """

    name: ClassVar[str] = "semi_hard"
    kind: ClassVar[str] = "semi-hard"

    def _select(self, a: int, row: Tensor | None, ctx: _Round) -> tuple[int, int] | None:
        assert row is not None
        pos, _ = _positives_negatives(a, ctx)
        if pos.numel() == 0:
            return None
        p = _draw(pos, ctx.u_pos[a])
        d2 = squared_distance(row)  # self is -inf in row -> inf here
        d2p = d2[p]
        eligible = (ctx.labels != ctx.labels[a]) & (d2 > d2p)
        if not bool(eligible.any()):
            return None
        n = int(torch.where(eligible, d2, math.inf).argmin())
        if not bool(d2[n] < d2p + ctx.margin):
            return None
        return p, n


class BatchHardMiner(_PerAnchorMiner):
    """Baseline after Hermans et al. / PML: the farthest positive and the nearest negative.

    Positive: the least similar other image of the anchor's class; negative: the most similar image
    of another class (the lowest index among equal similarities), over the whole pool.
    """

    name: ClassVar[str] = "batch_hard"
    kind: ClassVar[str] = "batch-hard"

    def _select(self, a: int, row: Tensor | None, ctx: _Round) -> tuple[int, int] | None:
        assert row is not None
        same = ctx.labels == ctx.labels[a]
        same[a] = False
        other = ctx.labels != ctx.labels[a]
        if not bool(same.any()) or not bool(other.any()):
            return None
        p = int(torch.where(same, row, math.inf).argmin())
        n = int(torch.where(other, row, -math.inf).argmax())
        return p, n


def _positives_negatives(a: int, ctx: _Round) -> tuple[Tensor, Tensor]:
    """Ascending indices of a's positives (without a) and of its negatives."""
    same = ctx.labels == ctx.labels[a]
    same[a] = False
    return torch.nonzero(same).flatten(), torch.nonzero(ctx.labels != ctx.labels[a]).flatten()


def _draw(choices: Tensor, u: Tensor) -> int:
    """choices[floor(u * len)], a uniform pick from a pre-drawn u in [0, 1)."""
    return int(choices[min(int(float(u) * choices.numel()), choices.numel() - 1)])


def _rank_in_row(rows: Tensor, cols: Tensor) -> Tensor:
    """0-based rank of rows[i, cols[i]] in row i under (similarity desc, index asc)."""
    if cols.numel() == 0:
        return cols.clone()
    vals = rows.gather(1, cols[:, None])  # (T, 1)
    index = torch.arange(rows.shape[1], device=rows.device)[None, :]
    return (rows > vals).sum(1) + ((rows == vals) & (index < cols[:, None])).sum(1)
