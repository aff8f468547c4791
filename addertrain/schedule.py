"""Learning rate per optimizer step: linear warmup, then cosine decay or constant.

The rate is a function of the step alone: a resumed run needs no schedule state, and a
step DeepSpeed skips (fp16 overflow) moves the schedule on like any other step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from addertrain.config import ScheduleConfig


def lr_factor(step: int, total: int, warmup: int, cfg: ScheduleConfig, base_lr: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr / base_lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedule(
    cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int, base_lr: float
) -> Callable[[int], float]:
    """The learning rate of optimizer step ``step`` (0-based)."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return lambda step: base_lr * lr_factor(step, total_steps, warmup, cfg, base_lr)
