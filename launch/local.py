"""Run the worker function in this process: alone, or as one rank of an external launcher
(torchrun, srun) that exported RANK/WORLD_SIZE. No Ray import."""

from __future__ import annotations

from addertrain.config import Config


def run(cfg: Config) -> None:
    from addertrain.worker import train_worker

    train_worker(cfg.to_dict())
