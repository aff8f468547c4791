"""The DeepSpeed engine for one worker: config from the recipe and the actual world size."""

from __future__ import annotations

from addertrain.config import Config
from addertrain.errors import UserError


def batch_split(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro batch per worker, gradient accumulation steps) for the recipe's global batch."""
    t = cfg.train
    if t.global_batch % (t.micro_batch * world_size):
        raise UserError(
            f"train.global_batch={t.global_batch} cannot be split over {world_size} worker(s) with "
            f"train.micro_batch={t.micro_batch}: it must be a multiple of micro_batch x workers "
            f"= {t.micro_batch * world_size}")
    return t.micro_batch, t.global_batch // (t.micro_batch * world_size)


def check_precision(cfg: Config, device_type: str) -> None:
    if cfg.train.precision == "fp16" and device_type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA device (DeepSpeed has no fp16 on CPU); "
                        "use train.precision=bf16 or fp32")
    if cfg.distributed.zero_stage == 3:
        raise UserError("distributed.zero_stage=3 is not supported: adder layers are small next to "
                        "their activations, so stage 3 saves little; use 0, 1 or 2")


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    micro, accum = batch_split(cfg, world_size)
    ds = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        # Our client SGD (with the adaptive lr) is not on DeepSpeed's tested list.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    if cfg.train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.train.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    return ds


def initialize(cfg: Config, model, optimizer, scheduler, world_size: int):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size), dist_init_required=False)
    return engine
