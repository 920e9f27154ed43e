"""Learning-rate schedule of the paper: linear warm-up, step decay, and slow in-period decay."""

from __future__ import annotations

from msvlad.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimiser step `step` (0-based); pure, so a resume needs no state."""
    if step < cfg.warmup_steps:
        return cfg.lr_start + (cfg.lr - cfg.lr_start) * step / cfg.warmup_steps
    period, offset = divmod(step, cfg.decay_every)
    return cfg.lr * cfg.gamma**period / (1.0 + offset * cfg.lr_decay)
