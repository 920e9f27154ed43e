"""The miners by their params.yaml name (`miner.name`), and the factory that builds one."""

from __future__ import annotations

import inspect
from typing import Any

from msvlad.mining.base import TripletMiner
from msvlad.mining.baselines import BatchHardMiner, HardestNegativeMiner, RandomMiner, SemiHardMiner
from msvlad.mining.difficulty import DifficultyMiner

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
