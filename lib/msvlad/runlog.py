"""Column names of the CSV logs a training run writes (shared by the trainer and the reports)."""

from __future__ import annotations

LOG_FIELDS = ["epoch", "step", "lr", "loss", "triplets", "rounds", "yield", "val_map", "seconds"]
ROUND_FIELDS = [
    "round",
    "step",
    "pool",
    "candidates",
    "triplets",
    "semi_hard",
    "hard",
    "mean_loss",
    "describe_seconds",
    "mine_seconds",
]
TRIPLET_FIELDS = [
    "round",
    "step",
    "anchor",
    "positive",
    "negative",
    "anchor_label",
    "negative_label",
    "pos_rank",
    "neg_rank",
    "pos_sim",
    "neg_sim",
    "loss",
    "kind",
]
