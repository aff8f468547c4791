"""Run the worker function on a Ray cluster through Ray Train's TorchTrainer.

Ray creates the torch process group and exports RANK/LOCAL_RANK/WORLD_SIZE; each worker
then builds its own DeepSpeed engine on that group (addertrain.worker). Without an address
an embedded single-node cluster (launch/embedded_ray.py) is started for the run and stopped
after it; either way the recipe must fit the resources that exist. Before training, every
worker checks that it sees the run directory and the dataset (launch/nodes.py) and warms the
Triton kernels (addertrain/warmup.py). A UserError in a worker ends the launch as it would in
this process: one line, exit code 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from pathlib import Path

from addertrain import console, preempt
from addertrain.config import Config
from addertrain.errors import UserError
from addertrain.launch import nodes


def worker_env_vars(cfg: Config) -> dict[str, str]:
    """Environment every worker needs before DeepSpeed, DALI or NCCL are imported: the
    launch's own by prefix (launch/nodes.py), and settings of ours."""
    env = {
        "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/addertrain/torch_extensions"),
        **nodes.forwarded_env(),
        # Ray Train's print patch tees into Ray's own stdout capture: every line twice
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        console.ENV: str(console.verbosity()),
    }
    if cfg.distributed.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an unreachable address for minutes; a plain TCP connect answers in seconds."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(
            f"Ray address {address!r} must look like host:port (or 'auto' inside a "
            "Ray or Slurm allocation)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(
            f"nothing answers at the Ray address {address} ({e.strerror or e}); start the "
            "cluster first (ray start --head, or slurm/submit.sh) or fix the address"
        ) from None


@contextlib.contextmanager
def cluster(address: str | None, cfg: Config):
    """Join ``address``, or run on an embedded cluster for the duration; yields the address."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # a caller's (tests)
        yield sys.modules["ray"].get_runtime_context().gcs_address
        return
    if address:
        import ray

        if address != "auto":
            _check_reachable(address)
        try:
            from addertrain.launch.embedded_ray import worker_setup

            ray.init(
                address=address,
                logging_level="WARNING",
                log_to_driver=True,
                runtime_env={
                    "worker_process_setup_hook": f"{worker_setup.__module__}.worker_setup"
                },
            )
        except Exception as e:  # Ray raises several types for a refused or unauthenticated join
            raise UserError(
                f"cannot join the Ray cluster at {address}: {type(e).__name__}: "
                f"{str(e).splitlines()[0]}. "
                "Check the address, that the cluster is up, and that this client has the cluster's "
                "auth token (RAY_AUTH_MODE=token with the token file, see the README)"
            ) from None
        yield address
        return
    from addertrain.launch import embedded_ray

    # What this machine has, not what the recipe asks for: a cluster declared larger hands
    # out GPU ids that do not exist.
    have = machine_resources()
    _check_fits(cfg, have, "this machine")
    with embedded_ray.cluster(
        num_cpus=have["CPU"], num_gpus=have["GPU"], logging_level="WARNING"
    ) as embedded:
        yield embedded


def machine_resources() -> dict[str, int]:
    """The CPUs this process may run on and the GPUs torch can use."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"CPU": cpus or 1, "GPU": torch.cuda.device_count()}


def _check_fits(cfg: Config, have: dict, where: str) -> None:
    """Ray Train waits forever for workers it cannot place: refuse at once instead."""
    d = cfg.distributed
    least = d.min_workers if d.elastic else d.workers
    need = {"CPU": least * d.cpus_per_worker, "GPU": least * d.gpus_per_worker}
    for name, amount in need.items():
        if amount > have.get(name, 0) + 1e-9:
            who = (
                f"distributed.min_workers={least}" if d.elastic else f"distributed.workers={least}"
            )
            raise UserError(
                f"{who} need {amount:g} {name} in all "
                f"({d.cpus_per_worker:g} CPU, {d.gpus_per_worker:g} GPU each) but {where} has "
                f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU; lower "
                f"distributed.workers or the per-worker resources (distributed.gpus_per_worker=0 "
                "trains on CPUs)"
            )


def _check_resources(cfg: Config) -> None:
    import ray

    _check_fits(cfg, ray.cluster_resources(), "the Ray cluster")


class _HideUserErrors(logging.Filter):
    """Ray Train logs each exception of the training function with its traceback while it
    is being handled; a UserError is bad input, which the launcher reports as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not isinstance(sys.exc_info()[1], UserError)


def _ray_worker(config: dict) -> None:
    import ray
    import ray.train

    from addertrain import warmup
    from addertrain.worker import train_worker

    for handler in logging.getLogger("ray.train").handlers:
        handler.addFilter(_HideUserErrors())
    cfg = Config.model_validate(config["cfg"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    nodes.check(cfg, config["run_token"], rank, node)
    nodes.report(cfg, rank, node)
    warmup.before_training(cfg, context.get_local_rank())
    train_worker(config["cfg"])


def _fit(trainer) -> None:
    """``trainer.fit()``, with a worker's UserError raised here as it was raised there."""
    from ray.train import WorkerGroupError

    try:
        trainer.fit()
    except SystemExit:
        # Ray Train answers Ctrl-C by aborting the run and exiting from fit(): report it as
        # an interrupt, as in the local executor.
        raise KeyboardInterrupt from None
    except WorkerGroupError as e:
        # The other ranks' errors follow from the first one (a collective that lost a peer).
        bad = [err for _, err in sorted(e.worker_failures.items()) if isinstance(err, UserError)]
        if bad:
            raise UserError(str(bad[0])) from None
        raise


def _driver_console() -> None:
    """How Ray prints the workers' lines here, read when ray is first imported: without the
    ``(RayTrainWorker pid=...)`` prefix (rank 0's lines are the run's own; the other ranks
    name themselves, see addertrain/console.py) unless verbose, and without colour codes
    when the output is not a terminal."""
    if console.verbosity() <= 0:
        os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def run(cfg: Config, address: str | None) -> None:
    _driver_console()
    with cluster(address, cfg):  # first: the embedded cluster must set up before ray loads
        from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        # ray.init installs a fatal-signal handler for SIGTERM over ours, which checkpoints first.
        preempt.install_handlers(cfg.run_dir())
        _check_resources(cfg)
        d = cfg.distributed
        run_dir = Path(cfg.run_dir()).resolve()
        use_gpu = d.gpus_per_worker > 0
        resources = {"CPU": d.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = d.gpus_per_worker
        token = nodes.write_token(run_dir)
        # Ray Train's preemption watcher only logs drains of Ray nodes (a run's own stop request
        # is the run directory's, docs/resume.md), and each start of its actor prints a
        # core-worker error line. Ray Train hands the switch to its controller, wherever it runs.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"cfg": cfg.to_dict(), "run_token": token},
            scaling_config=ScalingConfig(
                # elastic: as many as there are, at least min_workers (Ray Train asks for all)
                num_workers=(d.min_workers, d.workers) if d.elastic else d.workers,
                use_gpu=use_gpu,
                resources_per_worker=resources,
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            # The run directory is the Ray experiment directory. No checkpoint is reported
            # to Ray Train: addertrain.checkpoint alone keeps them (docs/resume.md).
            run_config=RunConfig(
                name=run_dir.name,
                storage_path=str(run_dir.parent),
                failure_config=FailureConfig(max_failures=d.max_failures),
                worker_runtime_env={"env_vars": worker_env_vars(cfg)},
                # Ray Train's INFO lines (placement, each failure decision with the worker's
                # traceback) are noise next to our progress; its warnings stay.
                logging_config=LoggingConfig(
                    log_level="INFO" if console.verbosity() > 0 else "WARNING"
                ),
            ),
        )
        _fit(trainer)
