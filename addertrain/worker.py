"""The function every executor runs in each worker process."""

from __future__ import annotations

import os

import torch


def worker_env() -> None:
    """Settings DeepSpeed needs before it is imported in this process."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          os.path.expanduser("~/.cache/addertrain/torch_extensions"))


def train_worker(cfg_dict: dict) -> dict:
    worker_env()
    from addertrain import distributed
    from addertrain.config import Config
    from addertrain.trainer import Trainer

    cfg = Config.model_validate(cfg_dict)
    world = distributed.init(cfg.train.device)
    try:
        trainer = Trainer(cfg, world)
        result = trainer.fit()
        trainer.save_final()
        result["world_size"] = world.world_size
        result["device"] = str(world.device)
        return result
    finally:
        distributed.teardown()
