"""The miners by their params.yaml name (`miner.name`), and the factories that build one."""

from __future__ import annotations

from typing import Any

from msvlad.config import MinerConfig
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
    """Miner from its registry name and keywords; unknown names or keywords are one-line errors.

    Like the `miner` section of params.yaml, the keywords may hold settings that only other miners
    take (the difficulty miner's delta given to the random miner): those are left out.
    """
    if name not in MINERS:
        raise ValueError(f"miner: unknown name {name!r}; choose one of {sorted(MINERS)}")
    cls = MINERS[name]
    accepted = cls.keywords()
    others = {key for miner in MINERS.values() for key in miner.settings()}
    unknown = sorted(set(kwargs) - set(accepted) - others)
    if unknown:
        raise ValueError(f"miner {name!r}: unknown keyword(s) {unknown}; accepted: {accepted}")
    return cls(**{key: value for key, value in kwargs.items() if key in accepted})


def miner_from_config(config: MinerConfig, seed: int) -> TripletMiner:
    """The miner `config.name` names, built from the section's keys it takes."""
    return MINERS[config.name].from_config(config, seed)
