"""Run the worker function on a Ray cluster through Ray Train's TorchTrainer.

Ray creates the torch process group and exports RANK/LOCAL_RANK/WORLD_SIZE; each worker
then builds its own DeepSpeed engine on that group (addertrain.worker). Without an address
an embedded single-node cluster is started for the run and stopped after it.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from addertrain import preempt
from addertrain.config import Config
from addertrain.errors import UserError


def worker_env_vars(cfg: Config) -> dict[str, str]:
    """Environment every worker needs before DeepSpeed, DALI or NCCL are imported."""
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get(
               "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/addertrain/torch_extensions")),
           # Ray Train's print patch tees into Ray's own stdout capture: every line twice
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if cfg.distributed.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    for key in ("NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG", "GLOO_SOCKET_IFNAME",
                "TRITON_INTERPRET", "OMP_NUM_THREADS"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an unreachable address for minutes; a plain TCP connect answers in seconds."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"Ray address {address!r} must look like host:port (or 'auto' inside a "
                        "Ray or Slurm allocation)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"nothing answers at the Ray address {address} ({e.strerror or e}); start the "
                        "cluster first (ray start --head, or slurm/submit.sh) or fix the address") from None


def _connect(address: str | None, cfg: Config) -> bool:
    """Join ``address`` or start an embedded cluster; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        if address != "auto":
            _check_reachable(address)
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        except Exception as e:  # Ray raises several types for a refused or unauthenticated join
            raise UserError(
                f"cannot join the Ray cluster at {address}: {type(e).__name__}: {str(e).splitlines()[0]}. "
                "Check the address, that the cluster is up, and that this client has the cluster's "
                "auth token (RAY_AUTH_MODE=token with the token file, see the README)") from None
        return False
    d = cfg.distributed
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=max(os.cpu_count() or 1, int(d.workers * d.cpus_per_worker + 0.999)),
             num_gpus=int(d.workers * d.gpus_per_worker + 0.999) or None,
             include_dashboard=False, logging_level="WARNING", _temp_dir=temp)
    return True


def _check_resources(cfg: Config) -> None:
    """Ray Train waits forever for workers it cannot place: refuse at once instead."""
    import ray

    d = cfg.distributed
    have = ray.cluster_resources()
    need = {"CPU": d.workers * d.cpus_per_worker, "GPU": d.workers * d.gpus_per_worker}
    for name, amount in need.items():
        if amount > have.get(name, 0) + 1e-9:
            raise UserError(
                f"distributed.workers={d.workers} need {amount:g} {name} in all "
                f"({d.cpus_per_worker:g} CPU, {d.gpus_per_worker:g} GPU each) but the Ray cluster "
                f"has {have.get(name, 0):g}; lower distributed.workers or the per-worker resources")


def _ray_worker(config: dict) -> None:
    from addertrain.worker import train_worker

    train_worker(config["cfg"])


def run(cfg: Config, address: str | None) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = _connect(address, cfg)
    # ray.init installs a fatal-signal handler for SIGTERM over ours, which checkpoints first.
    preempt.install_handlers(cfg.run_dir())
    try:
        _check_resources(cfg)
        d = cfg.distributed
        run_dir = Path(cfg.run_dir()).resolve()
        use_gpu = d.gpus_per_worker > 0
        resources = {"CPU": d.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = d.gpus_per_worker
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"cfg": cfg.to_dict()},
            scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            # The run directory is the Ray experiment directory, so the checkpoints the
            # workers report from run_dir/checkpoints are Ray's without a copy.
            run_config=RunConfig(
                name=run_dir.name, storage_path=str(run_dir.parent),
                failure_config=FailureConfig(max_failures=d.max_failures),
                worker_runtime_env={"env_vars": worker_env_vars(cfg)}),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
