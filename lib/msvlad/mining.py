"""Offline triplet miners on a pool of cached descriptors: the paper's difficulty miner, baselines.

Vaccaro et al., MVA 2022, section on triplet mining (method.md section 3): every mining round a
class-balanced pool (`msvlad.sampler.ClassBalancedPool`) is embedded by the current network, and a
miner turns the pool's (N, D) L2-normalised descriptors and (N,) labels into at most
`triplets_per_round` (anchor, positive, negative) index triplets, one per anchor class.

Sign conventions (all miners, all records):
- similarity s(a, x) is the cosine (inner product of L2-normalised rows); an anchor's ranked list
  orders the other pool images by decreasing s, equal s by increasing index; ranks are 0-based and
  the anchor itself is not in its list;
- distance d2(a, x) = max(0, 2 - 2 s(a, x)), the squared Euclidean distance of unit vectors;
- predicted loss L = m + d2(a, p) - d2(a, n), the triplet loss before its hinge (margin m);
- "hard": the positive is ranked below the negative, d2(a, p) >= d2(a, n), so L >= m;
- "semi-hard": the positive is ranked above the negative, d2(a, p) <= d2(a, n), so L <= m
  (FaceNet's semi-hard band is d2(a, p) < d2(a, n) < d2(a, p) + m, i.e. 0 < L < m);
- "easy": L <= 0, a triplet that already satisfies the margin.
pytorch-metric-learning writes the same thing as m' = d(a, n) - d(a, p) (hard: m' <= 0, semi-hard:
0 < m' <= margin), i.e. m' = m - L here.

All returned index tensors are int64 on the CPU and index into the pool.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from msvlad.neighbors import BACKENDS, Backend, similarity_rows, topk_neighbors

log = logging.getLogger(__name__)

_ROW_BYTES = 1 << 27  # float64 similarity rows computed at once by the baseline miners
_NORM_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}  # default 1e-3


# ----------------------------------------------------------------------------- result record


@dataclass(frozen=True)
class MinedTriplets:
    """Triplets of one mining round plus a per-triplet record and round statistics.

    `anchors`, `positives`, `negatives` are int64 pool indices (the PML `a_idx, p_idx, n_idx`);
    ranks are 0-based positions in the anchor's ranked list (self excluded); sims are float64
    cosines; `losses` is the predicted loss m + d2(a, p) - d2(a, n). `considered` counts the
    anchors whose candidate was evaluated and `with_candidate` those that produced a valid
    triplet before the one-per-class rule and the cap.
    """

    anchors: Tensor
    positives: Tensor
    negatives: Tensor
    anchor_labels: Tensor
    negative_labels: Tensor
    pos_ranks: Tensor
    neg_ranks: Tensor
    pos_sims: Tensor
    neg_sims: Tensor
    losses: Tensor
    kinds: tuple[str, ...]
    considered: int
    with_candidate: int
    pool_size: int

    def __len__(self) -> int:
        """Number of triplets."""
        return int(self.anchors.numel())

    @property
    def yield_rate(self) -> float:
        """Fraction of considered anchors that produced a candidate triplet."""
        return self.with_candidate / self.considered if self.considered else 0.0

    @property
    def num_candidates(self) -> int:
        """Alias of `with_candidate`: anchors with a valid triplet before the class rule and cap."""
        return self.with_candidate

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        """(a_idx, p_idx, n_idx), the form losses and `TripletDataset` consume."""
        return self.anchors, self.positives, self.negatives

    def to_frame(self) -> pd.DataFrame:
        """One row per triplet: indices, labels, ranks, similarities, predicted loss and kind."""
        return pd.DataFrame(
            {
                "anchor": self.anchors.numpy(),
                "positive": self.positives.numpy(),
                "negative": self.negatives.numpy(),
                "anchor_label": self.anchor_labels.numpy(),
                "negative_label": self.negative_labels.numpy(),
                "pos_rank": self.pos_ranks.numpy(),
                "neg_rank": self.neg_ranks.numpy(),
                "pos_sim": self.pos_sims.numpy(),
                "neg_sim": self.neg_sims.numpy(),
                "loss": self.losses.numpy(),
                "kind": pd.Series(self.kinds, dtype=object),
            }
        )

    def stats(self) -> dict[str, float]:
        """Round summary with fixed keys (per-round logs): counts, yield, means, semi-hard share."""
        n = len(self)
        mean = (lambda t: float(t.mean())) if n else (lambda t: math.nan)
        return {
            "num_triplets": float(n),
            "considered": float(self.considered),
            "with_candidate": float(self.with_candidate),
            "yield": self.yield_rate,
            "mean_loss": mean(self.losses),
            "mean_pos_sim": mean(self.pos_sims),
            "mean_neg_sim": mean(self.neg_sims),
            "semi_hard_fraction": (sum(k == "semi-hard" for k in self.kinds) / n)
            if n
            else math.nan,
        }


# ----------------------------------------------------------------------------- base class


class TripletMiner:
    """Base miner: validation, no-grad, seeded RNG with state_dict, and the common keywords.

    Every miner takes the same keywords so one `miner` config section drives any of them:
    margin m (all: predicted loss; semi_hard: the band), delta (difficulty: loss window
    m +- delta), threshold (difficulty: max rank gap), semi_hard_prob (difficulty),
    triplets_per_round (all: cap), seed, backend ("torch" or "faiss" neighbour search) and
    chunk_size (rows scored at once).
    """

    name: ClassVar[str] = "base"

    def __init__(
        self,
        *,
        margin: float = 0.1,
        delta: float = 0.02,
        threshold: int = 20,
        semi_hard_prob: float = 0.5,
        triplets_per_round: int = 256,
        seed: int = 0,
        backend: Backend = "torch",
        chunk_size: int = 4096,
    ) -> None:
        _check_number("margin", margin, low=0.0, low_open=True)
        _check_number("delta", delta, low=0.0, low_open=True)
        _check_int("threshold", threshold, low=1)
        _check_number("semi_hard_prob", semi_hard_prob, low=0.0, high=1.0)
        _check_int("triplets_per_round", triplets_per_round, low=1)
        _check_int("seed", seed, low=0)
        _check_int("chunk_size", chunk_size, low=1)
        if backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
        self.margin = float(margin)
        self.delta = float(delta)
        self.threshold = int(threshold)
        self.semi_hard_prob = float(semi_hard_prob)
        self.triplets_per_round = int(triplets_per_round)
        self.seed = int(seed)
        self.backend: Backend = backend
        self.chunk_size = int(chunk_size)
        self.rounds = 0
        self._generator = torch.Generator().manual_seed(self.seed)

    def mine(self, descriptors: Tensor, labels: Tensor) -> MinedTriplets:
        """Mine one round from (N, D) L2-normalised descriptors and (N,) integer labels."""
        labels = _check_inputs(descriptors, labels)
        with torch.no_grad():
            out = self._mine(descriptors.detach(), labels)
        self.rounds += 1
        log.debug("%s round %d: %s", self.name, self.rounds, out.stats())
        return out

    def state_dict(self) -> dict[str, Any]:
        """RNG state and round counter: restoring it makes the next rounds mine identically."""
        return {
            "name": self.name,
            "seed": self.seed,
            "rounds": self.rounds,
            "rng_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (e.g. from a checkpoint loaded with weights_only)."""
        missing = {"name", "seed", "rounds", "rng_state"} - set(state)
        if missing:
            raise ValueError(f"miner state: missing keys {sorted(missing)}")
        if state["name"] != self.name:
            raise ValueError(f"miner state: saved by {state['name']!r}, loading into {self.name!r}")
        self._generator.set_state(torch.as_tensor(state["rng_state"], dtype=torch.uint8).cpu())
        self.rounds = int(state["rounds"])
        self.seed = int(state["seed"])

    def __repr__(self) -> str:
        keys = inspect.signature(TripletMiner.__init__).parameters
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in keys if k != "self")
        return f"{type(self).__name__}({args})"

    def _mine(self, desc: Tensor, labels: Tensor) -> MinedTriplets:
        raise NotImplementedError


# ----------------------------------------------------------------------------- the paper's miner


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
        return _record(
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


def predicted_loss(pos_sims: Tensor, neg_sims: Tensor, margin: float) -> Tensor:
    """m + d2(a, p) - d2(a, n) with d2 = max(0, 2 - 2 cos): the triplet loss before the hinge."""
    return margin + squared_distance(pos_sims) - squared_distance(neg_sims)


def squared_distance(sims: Tensor) -> Tensor:
    """Squared Euclidean distance of unit vectors from their cosine, clamped at 0."""
    return (2.0 - 2.0 * sims).clamp(min=0.0)


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


# ----------------------------------------------------------------------------- baselines


@dataclass
class _Round:
    """Per-round context handed to a baseline's per-anchor rule."""

    labels: Tensor  # (N,) on the descriptors' device
    class_ids: Tensor  # (N,) labels mapped to 0..C-1
    u_pos: Tensor  # (N,) uniform draws for a random positive
    u_neg: Tensor  # (N,) uniform draws for a random negative
    used_negative_class: Tensor  # (C,) bool, for the one-negative-per-class rule
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
        used = torch.zeros(num_classes, dtype=torch.bool, device=dev)
        ctx = _Round(labels, class_ids, u_pos, u_neg, used, self.margin)
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
                ctx.used_negative_class[class_ids[pick[1]]] = True
                if len(chosen) == self.triplets_per_round:
                    break
            if len(chosen) == self.triplets_per_round:
                break
        trip = torch.tensor(chosen, dtype=torch.long, device=dev).reshape(-1, 3)
        a_idx, p_idx, n_idx = trip.unbind(1)
        rows = similarity_rows(desc, a_idx, exclude_self=True)  # (T, N) for the record
        return _record(
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
    """Baseline: a uniformly random positive and a uniformly random negative per anchor."""

    name: ClassVar[str] = "random"
    kind: ClassVar[str] = "random"
    needs_rows: ClassVar[bool] = False

    def _select(self, a: int, row: Tensor | None, ctx: _Round) -> tuple[int, int] | None:
        pos, neg = _positives_negatives(a, ctx)
        if pos.numel() == 0 or neg.numel() == 0:
            return None
        return _draw(pos, ctx.u_pos[a]), _draw(neg, ctx.u_neg[a])


class HardestNegativeMiner(_PerAnchorMiner):
    """Baseline after cirtorch: a random positive and the nearest negative of an unused class.

    As in cirtorch's `create_epoch_tuples`, positives are not mined and negatives are the
    hardest in the pool with at most one image per class: a class that already gave a negative
    this round is skipped, and the anchor's next nearest negative is taken instead.
    """

    name: ClassVar[str] = "hardest_negative"
    kind: ClassVar[str] = "hardest-negative"

    def _select(self, a: int, row: Tensor | None, ctx: _Round) -> tuple[int, int] | None:
        assert row is not None
        pos, _ = _positives_negatives(a, ctx)
        eligible = (ctx.labels != ctx.labels[a]) & ~ctx.used_negative_class[ctx.class_ids]
        if pos.numel() == 0 or not bool(eligible.any()):
            return None
        n = int(torch.where(eligible, row, -math.inf).argmax())  # first index among equal maxima
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
    """Baseline after Hermans et al. / PML: the farthest positive and the nearest negative."""

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


MINERS: dict[str, type[TripletMiner]] = {
    "difficulty": DifficultyMiner,
    "random": RandomMiner,
    "hardest_negative": HardestNegativeMiner,
    "semi_hard": SemiHardMiner,
    "batch_hard": BatchHardMiner,
}


def build_miner(name: str, **kwargs: Any) -> TripletMiner:
    """Miner from its registry name and keywords; unknown names or keywords are one-line errors."""
    if name not in MINERS:
        raise ValueError(f"miner: unknown name {name!r}; choose one of {sorted(MINERS)}")
    accepted = [k for k in inspect.signature(TripletMiner.__init__).parameters if k != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"miner {name!r}: unknown keyword(s) {unknown}; accepted: {accepted}")
    return MINERS[name](**kwargs)


# ----------------------------------------------------------------------------- helpers


def _leading_false(mask: Tensor) -> Tensor:
    """Index of the first True in each row of (N, k) `mask`, k where there is none."""
    return (mask.cumsum(1) == 0).sum(1)


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


def _record(
    *,
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor,
    labels: Tensor,
    pos_ranks: Tensor,
    neg_ranks: Tensor,
    pos_sims: Tensor,
    neg_sims: Tensor,
    margin: float,
    kinds: tuple[str, ...],
    considered: int,
    with_candidate: int,
) -> MinedTriplets:
    """Assemble a MinedTriplets on the CPU."""
    cpu = torch.device("cpu")
    pos_sims = pos_sims.double()
    neg_sims = neg_sims.double()
    return MinedTriplets(
        anchors=anchors.to(cpu, torch.long),
        positives=positives.to(cpu, torch.long),
        negatives=negatives.to(cpu, torch.long),
        anchor_labels=labels[anchors].to(cpu, torch.long),
        negative_labels=labels[negatives].to(cpu, torch.long),
        pos_ranks=pos_ranks.to(cpu, torch.long),
        neg_ranks=neg_ranks.to(cpu, torch.long),
        pos_sims=pos_sims.to(cpu),
        neg_sims=neg_sims.to(cpu),
        losses=predicted_loss(pos_sims, neg_sims, margin).to(cpu),
        kinds=kinds,
        considered=considered,
        with_candidate=with_candidate,
        pool_size=int(labels.numel()),
    )


def _check_inputs(descriptors: Tensor, labels: Tensor | np.ndarray) -> Tensor:
    """Validate the miner's inputs; return labels as int64 on the descriptors' device."""
    if (
        not isinstance(descriptors, Tensor)
        or descriptors.ndim != 2
        or not descriptors.is_floating_point()
    ):
        raise ValueError(
            "descriptors: expected a floating (N, D) tensor, got "
            f"{getattr(descriptors, 'dtype', type(descriptors).__name__)} "
            f"of shape {tuple(getattr(descriptors, 'shape', ()))}"
        )
    n = descriptors.shape[0]
    if n < 2:
        raise ValueError(f"descriptors: need at least 2 rows, got {n}")
    with torch.no_grad():
        finite = (
            torch.isfinite(descriptors.amax(1)).all() & torch.isfinite(descriptors.amin(1)).all()
        )
    if not bool(finite):
        raise ValueError("descriptors: contain NaN or inf")
    norms = torch.linalg.vector_norm(descriptors.detach().float(), dim=1)
    tol = _NORM_TOL.get(descriptors.dtype, 1e-3)
    worst = float((norms - 1).abs().max())
    if worst > tol:
        raise ValueError(f"descriptors: rows must be L2-normalised (max |norm - 1| = {worst:.3g})")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() != n:
        raise ValueError(f"labels: expected shape ({n},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor, got {labels.dtype}")
    return labels.to(device=descriptors.device, dtype=torch.long)


def _check_number(
    name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bracket = "(" if low_open else "["
        upper = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name}: must be a number in {bracket}{low}, {upper}, got {value!r}")


def _check_int(name: str, value: Any, *, low: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
