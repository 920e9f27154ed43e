"""Triplet mining: the paper's difficulty miner, the baselines, the class-balanced pool, neighbours.

`base` holds the `TripletMiner` base class and the `MinedTriplets` record; `difficulty` the
paper's miner; `baselines` random / hardest-negative / semi-hard / batch-hard; `registry` maps
`miner.name` to a class; `pool` draws each round's class-balanced pool; `neighbors` is the exact
chunked top-k the miners rank with.
"""

from msvlad.mining.base import MinedTriplets, TripletMiner
from msvlad.mining.registry import MINERS, build_miner

__all__ = ["MINERS", "MinedTriplets", "TripletMiner", "build_miner"]
