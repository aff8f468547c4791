"""The function every executor runs in each worker process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def worker_env() -> None:
    """Settings DeepSpeed needs before it is imported in this process."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/addertrain/torch_extensions")
    )
    # DeepSpeed unpickles checkpoints with weights_only=False; torch reads this switch on every
    # load, so no file swapped in after checkpoint.verify can run code in a worker either.
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def train_worker(cfg_dict: dict, started_at: float | None = None) -> None:
    """Train (from a checkpoint if there is one); rank 0 leaves the summary in
    ``run_dir/result.json`` for the launcher, with ``status`` completed or preempted, and its
    phases (addertrain/phases.py) timed from ``started_at`` (a ``time.time()`` stamp: when the
    executor's worker function began; default now)."""
    started_at = started_at or time.time()
    worker_env()
    from addertrain import checkpoint, console, distributed
    from addertrain.config import Config
    from addertrain.phases import Phases
    from addertrain.trainer import Trainer

    cfg = Config.model_validate(cfg_dict)
    world = distributed.init(cfg.train.device)
    console.setup(world.rank)
    phases = Phases()
    phases.since("worker_setup", started_at)
    trainer = Trainer(cfg, world, phases)
    # The run's own latest checkpoint comes first: after a failure Ray restarts the workers
    # with the same arguments, and they must continue, not go back to the launch's start.
    # Whichever it is, Checkpointer.load verifies it here, in the process that unpickles it.
    start = checkpoint.latest(cfg.run_dir()) or (
        cfg.checkpoint.resume and checkpoint.find(cfg.checkpoint.resume)
    )
    if start:
        with phases.timed("resume"):
            trainer.resume(start)
    result = trainer.fit()
    if result["status"] == "completed":
        with phases.timed("export"):
            trainer.save_final()
    # Only on success: after a failure on one rank a barrier would wait for the others forever.
    if world.is_main:
        result.update(
            world_size=world.world_size,
            device=str(world.device),
            **phases.record(),
            # for the launcher, to place rank 0's part on its own timeline
            worker_started_at=started_at,
            worker_finished_at=time.time(),
            first_step_at=phases.ends.get("first_step"),  # launch to first step (bench launch)
        )
        write_result(cfg.run_dir(), result)
    distributed.teardown()


def write_result(run_dir: Path, result: dict) -> None:
    """``run_dir/result.json``, replaced whole: the other ranks of torchrun or srun read it
    as soon as they pass the teardown barrier, and must never see it half-written."""
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, run_dir / "result.json")
