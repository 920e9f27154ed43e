"""Learning-rate schedule of the paper: linear warm-up, step decay, and slow in-period decay.

Two conventions (`train.lr_schedule`), both pure functions of the step so a resume needs no state:
- "aligned": step t uses the rate of t; the warm-up is a plain linear ramp and the in-period decay
  1/(1 + (t mod P) delta) starts after it;
- "lagged": the authors' released code, a LambdaLR stepped after each Adam step, so step t uses
  the multiplier of t - 1 (step 0 that of 0), and the in-period divisor also acts during the
  warm-up. With the paper's values the two differ by at most 0.45 %, plus one extra old-rate step
  at each decay. (After a resume their code also restarts with the multiplier of 0 once; that
  artefact of rebuilding the scheduler is not reproduced.)
"""

from __future__ import annotations

from msvlad.config import TrainConfig

LR_SCHEDULES: tuple[str, ...] = ("aligned", "lagged")  # = config.LrSchedule


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimiser step `step` (0-based) under `cfg.lr_schedule`."""
    if cfg.lr_schedule == "lagged":
        return cfg.lr * lagged_multiplier(max(step - 1, 0), cfg)
    if cfg.lr_schedule != "aligned":
        raise ValueError(f"train.lr_schedule: {cfg.lr_schedule!r} is not one of {LR_SCHEDULES}")
    if step < cfg.warmup_steps:
        return cfg.lr_start + (cfg.lr - cfg.lr_start) * step / cfg.warmup_steps
    period, offset = divmod(step, cfg.decay_every)
    return cfg.lr * cfg.gamma**period / (1.0 + offset * cfg.lr_decay)


def lagged_multiplier(t: int, cfg: TrainConfig) -> float:
    """The authors' multiplier f(t): (ramp or gamma^(t // P)) / (1 + (t mod P) delta).

    The ramp goes from lr_start/lr at t = 0 towards 1 at t = warmup_steps; the operations are
    ordered as in their code so the float64 rates match it exactly.
    """
    if t < cfg.warmup_steps:
        start = cfg.lr_start / cfg.lr
        ramp = 1.0 * t / cfg.warmup_steps + start * (1.0 - t / cfg.warmup_steps)
    else:
        ramp = 1.0 * cfg.gamma ** (t // cfg.decay_every)
    return ramp * 1 / (1 + (t % cfg.decay_every) * cfg.lr_decay)
