"""What the driver hands to the workers' nodes, and what each worker confirms on its own node.

A run assumes one run directory on storage that every node shares (checkpoints, result.json,
the stop request, Ray's experiment folder) and one dataset path that every node reads.
Nothing makes a path shared: a node that mounts another disk there, or none, would train and
write its checkpoint parts where rank 0 never looks. So the driver leaves a random token in
the run directory, and every worker reads it back on its node and checks the dataset's
splits before it trains; then it records its node, devices and environment in
``workers/rank<r>.json`` (what to compare when one node behaves differently).

Environment: a worker inherits the environment of the raylet that started it, which on a
cluster joined with ``--address`` is not the launch's; the variables that tune NCCL, Triton,
DALI and CUDA are passed along by prefix.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from addertrain.config import Config
from addertrain.errors import UserError

TOKEN_FILE = ".run-token"
REPORTS = "workers"
FORWARD_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TRITON_", "DALI_", "CUDA_")
FORWARD_NAMES = ("OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "TORCH_EXTENSIONS_DIR")
# Ray assigns each worker its GPUs through this one: the launch's value would override them.
NOT_FORWARDED = ("CUDA_VISIBLE_DEVICES",)


def forwarded(name: str) -> bool:
    return name not in NOT_FORWARDED and (
        name in FORWARD_NAMES or name.startswith(FORWARD_PREFIXES)
    )


def forwarded_env() -> dict[str, str]:
    """The launch environment's variables that every worker gets."""
    return {k: v for k, v in os.environ.items() if forwarded(k)}


def write_token(run_dir: Path) -> str:
    """A fresh token in ``run_dir`` for the workers to find; reports of an earlier launch go."""
    token = secrets.token_hex(16)
    (run_dir / TOKEN_FILE).write_text(token)
    shutil.rmtree(run_dir / REPORTS, ignore_errors=True)
    return token


def check(cfg: Config, token: str, rank: int, node: str) -> None:
    """In a worker: the run directory is the one the driver wrote, and the dataset is there."""
    run_dir = cfg.run_dir()
    try:
        found = (run_dir / TOKEN_FILE).read_text().strip()
    except OSError:
        found = None
    if found != token:
        what = "finds no" if found is None else "finds another launch's"
        raise UserError(
            f"worker rank {rank} on node {node} {what} {TOKEN_FILE} "
            f"in the run directory {run_dir}: "
            "it does not see the folder this launch wrote. The run directory holds the checkpoints "
            "of every rank and must be one folder on storage every node shares (NFS, Lustre, ...); "
            "set run.dir to a path mounted on every node"
        )
    d = cfg.data
    if d.source == "folder":
        for split in (d.train_split, d.val_split):
            folder = Path(d.root) / split
            if not folder.is_dir():
                raise UserError(
                    f"worker rank {rank} on node {node} does not see the dataset folder {folder} "
                    f"(data.root={d.root}), which the launch checked on its own node; every node "
                    "must see the same dataset at the same path (shared storage, or a copy on each "
                    "node): fix the mount, or set data.root to a path every node has"
                )


def report(cfg: Config, rank: int, node: str) -> Path:
    """``workers/rank<r>.json``: where this rank runs and what it got."""
    import torch

    folder = cfg.run_dir() / REPORTS
    folder.mkdir(exist_ok=True)
    path = folder / f"rank{rank}.json"
    path.write_text(
        json.dumps(
            {
                "rank": rank,
                "node": node,
                "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "gpus": torch.cuda.device_count(),
                "env": dict(sorted(forwarded_env().items())),
            },
            indent=2,
        )
    )
    return path
