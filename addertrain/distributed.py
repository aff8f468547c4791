"""Process group and device for one worker.

Executors start workers with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set (Ray
Train creates the group itself); a lone process gets a one-rank group so DeepSpeed, which
always wants one, never tries MPI discovery. That group meets in an in-memory store: no
TCP port, so nothing to race another process for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from addertrain.errors import UserError


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SLURM_TO_TORCH = {
    "SLURM_PROCID": "RANK",
    "SLURM_NTASKS": "WORLD_SIZE",
    "SLURM_LOCALID": "LOCAL_RANK",
}


def _under_srun() -> bool:
    """srun ranks count as a process group only when the job exported a rendezvous address."""
    return "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ


def launcher_rank() -> int:
    """This process's rank under an external launcher (torchrun, srun); 0 when alone."""
    if _under_srun():
        return int(os.environ["SLURM_PROCID"])
    return int(os.environ.get("RANK", "0"))


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "train.device=cuda but no CUDA device is visible; use train.device=auto or cpu"
        )
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def init(requested_device: str) -> WorldInfo:
    """Join (or create) the default process group and pick this worker's device."""
    if _under_srun():
        for src, dst in SLURM_TO_TORCH.items():
            os.environ[dst] = os.environ[src]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    alone = os.environ["WORLD_SIZE"] == "1"
    if not alone and "MASTER_PORT" not in os.environ:
        raise UserError(
            "WORLD_SIZE > 1 but MASTER_PORT is unset; launch through addertrain, "
            "torchrun or srun with MASTER_ADDR/MASTER_PORT exported"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if requested_device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    device = pick_device(requested_device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if alone:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(backend)
    return WorldInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown() -> None:
    """Barrier, then destroy: without it gloo runs abort at exit about one time in four."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
