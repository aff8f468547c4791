"""Learning-rate schedule per optimizer step: linear warmup, then cosine decay or constant."""

from __future__ import annotations

import math

import torch

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


def build_scheduler(optimizer, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int,
                    base_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg, base_lr))
