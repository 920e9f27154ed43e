"""Offline triplet miners on a pool of cached descriptors: the paper's difficulty miner, baselines.

Vaccaro et al., MVA 2022, section on triplet mining (docs/method.md, "Mining"): every mining round a
class-balanced pool (`msvlad.mining.pool.ClassBalancedPool`) is embedded by the current network, and
a miner turns the pool's (N, D) L2-normalised descriptors and (N,) labels into at most
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

import dataclasses
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from msvlad.config import MinerConfig, check_value
from msvlad.mining.neighbors import Backend

log = logging.getLogger(__name__)

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
        """(a_idx, p_idx, n_idx), the PML `indices_tuple` form."""
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
    """Base miner: validation, no-grad, per-round seeded RNG with state_dict, the common settings.

    Round r (0-based, counted by `rounds`) draws its randomness from a generator seeded with
    `seed + r`, so a round depends only on (seed, r): the trainer builds the miner once, saves its
    `state_dict` in the checkpoint, and a resumed run mines the same rounds.

    A miner's settings are the keyword arguments of its constructor (and of its bases'): each is a
    key of params.yaml's `miner` section, with that key's default (`msvlad.config.MinerConfig`)
    and range (`msvlad.config.RANGES`), checked by `setting`, so the params file and the miner
    cannot disagree. Every miner takes margin m (the predicted loss; semi_hard: the band),
    triplets_per_round (the cap) and backend ("torch" or "faiss" neighbour search); a subclass
    adds its own (the difficulty miner: delta, threshold, semi_hard_prob). `from_config` builds a
    miner from the `miner` section, taking only its own keys. `seed` and `chunk_size` (rows
    scored at once) are not params keys.
    """

    name: ClassVar[str] = "base"

    def __init__(
        self,
        *,
        margin: float = MinerConfig.margin,
        triplets_per_round: int = MinerConfig.triplets_per_round,
        backend: Backend = MinerConfig.backend,
        seed: int = 0,
        chunk_size: int = 4096,
    ) -> None:
        self.margin: float = setting("margin", margin)
        self.triplets_per_round: int = setting("triplets_per_round", triplets_per_round)
        self.backend: Backend = setting("backend", backend)
        _check_int("seed", seed, low=0)
        _check_int("chunk_size", chunk_size, low=1)
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        self.rounds = 0
        self._generator = torch.Generator()

    @classmethod
    def keywords(cls) -> tuple[str, ...]:
        """Every keyword the constructor takes: its own and those of its bases, base first."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            init = vars(klass).get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.name not in names:
                    names.append(p.name)
        return tuple(names)

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        """The `miner` keys of params.yaml this miner takes."""
        fields = {f.name for f in dataclasses.fields(MinerConfig)}
        return tuple(k for k in cls.keywords() if k in fields)

    @classmethod
    def from_config(cls, config: MinerConfig, seed: int) -> TripletMiner:
        """The miner of a `miner` config section: its own settings, read from the section."""
        return cls(seed=seed, **{key: getattr(config, key) for key in cls.settings()})

    def mine(self, descriptors: Tensor, labels: Tensor) -> MinedTriplets:
        """Mine one round from (N, D) L2-normalised descriptors and (N,) integer labels."""
        labels = _check_inputs(descriptors, labels)
        self._generator.manual_seed(self.seed + self.rounds)
        with torch.no_grad():
            out = self._mine(descriptors.detach(), labels)
        self.rounds += 1
        log.debug("%s round %d: %s", self.name, self.rounds, out.stats())
        return out

    def state_dict(self) -> dict[str, Any]:
        """Name, seed and round counter: restoring them makes the next rounds mine identically."""
        return {"name": self.name, "seed": self.seed, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (e.g. from a checkpoint loaded with weights_only)."""
        missing = {"name", "seed", "rounds"} - set(state)
        if missing:
            raise ValueError(f"miner state: missing keys {sorted(missing)}")
        if state["name"] != self.name:
            raise ValueError(f"miner state: saved by {state['name']!r}, loading into {self.name!r}")
        self.rounds = int(state["rounds"])
        self.seed = int(state["seed"])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.keywords())
        return f"{type(self).__name__}({args})"

    def _mine(self, desc: Tensor, labels: Tensor) -> MinedTriplets:
        raise NotImplementedError


def predicted_loss(pos_sims: Tensor, neg_sims: Tensor, margin: float) -> Tensor:
    """m + d2(a, p) - d2(a, n) with d2 = max(0, 2 - 2 cos): the triplet loss before the hinge."""
    return margin + squared_distance(pos_sims) - squared_distance(neg_sims)


def squared_distance(sims: Tensor) -> Tensor:
    """Squared Euclidean distance of unit vectors from their cosine, clamped at 0."""
    return (2.0 - 2.0 * sims).clamp(min=0.0)


def build_record(
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


def setting(key: str, value: Any) -> Any:
    """A miner setting checked as params.yaml's `miner.<key>` (its type and range), converted."""
    return check_value(f"miner.{key}", value)


def _check_int(name: str, value: Any, *, low: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
