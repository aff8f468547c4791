"""The DeepSpeed engine for one worker: config from the recipe and the actual world size."""

from __future__ import annotations

import contextlib
import io

from addertrain.alr import once_per_step
from addertrain.config import Config
from addertrain.console import LOG


def zero_config(stage: int) -> dict:
    """ZeRO 1/2 reduce gradient buckets from hooks during the backward (``overlap_comm``), in
    buckets of 2**23 elements (32 MB fp32: ResNet-50's 25.6 M gradients make 4, and all but
    the last go out while the backward continues; DeepSpeed's default of 5e8 elements holds the
    whole model in one bucket, reduced at the end). ZeRO 0 has no such option: DeepSpeed
    all-reduces the whole gradient after the backward (docs/performance.md)."""
    if stage in (1, 2):
        return {"stage": stage, "overlap_comm": True, "reduce_bucket_size": 2**23}
    return {"stage": stage}


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    micro, accum = cfg.batch_split(world_size)
    ds = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero_config(cfg.distributed.zero_stage),
        # Our client SGD (with the adaptive lr) is not on DeepSpeed's tested list.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed clips at 1.0 when the key is absent; AdderSGD clips (optim.grad_clip)
        # after the ALR, on the parameters the ALR does not normalise.
        "gradient_clipping": 0.0,
    }
    if cfg.train.precision == "bf16":
        # bf16 weights and activations; gradients accumulated and all-reduced in fp32
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    elif cfg.train.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    return ds


def skip_inference_comm_op() -> None:
    """On its CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op
    (deepspeed_shm_comm) when it sets up communication, but only DeepSpeed inference's
    all-reduce uses it: training reduces through torch.distributed (gloo). Compiling it took
    25-48 s on the first launch after setup (docs/performance.md, launch to first step).
    DeepSpeed skips an op its table of compatible ops marks off; the table is built once per
    process and kept, so the mark holds."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def initialize(cfg: Config, model, optimizer, world_size: int):
    """The engine, without a schedule: the trainer sets the learning rate of each step
    itself, so that a step DeepSpeed skips (fp16 overflow) cannot shift the schedule."""
    import deepspeed

    skip_inference_comm_op()
    # DeepSpeed prints (rather than logs) on every CPU rank that it built its shared-memory
    # communication op: a debug line here (launch -v). Its log records are not affected.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(cfg, world_size),
            dist_init_required=False,
        )
    for line in printed.getvalue().splitlines():
        LOG.debug(f"deepspeed: {line}")
    once_per_step(engine.optimizer, optimizer)
    return engine
