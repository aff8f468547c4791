"""Run the worker function on a Ray cluster through Ray Train's TorchTrainer.

Ray creates the torch process group and exports RANK/LOCAL_RANK/WORLD_SIZE; each worker
then builds its own DeepSpeed engine on that group (addertrain.worker). Without an address
an embedded single-node cluster (launch/embedded_ray.py) is started for the run and stopped
after it; either way the recipe must fit the resources that exist. Before training, every
worker checks that it sees the run directory and the dataset (launch/nodes.py) and warms the
Triton kernels (addertrain/warmup.py). A UserError in a worker ends the launch as it would in
this process: one line, exit code 2; any other failure of the workers (a lost node, a hung
peer, out of memory, ...) is one line too, with its exit code (launch/failures.py). On a
cluster a failed worker group is restarted; every wait is bounded (distributed.*_timeout_s).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
from pathlib import Path

from addertrain import console, preempt
from addertrain.config import Config
from addertrain.errors import UserError
from addertrain.launch import failures, nodes
from addertrain.phases import Phases


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


def alive_resources() -> tuple[dict, list[str], list[str]]:
    """(the resources of the cluster's alive nodes, their addresses, the dead nodes'):
    ``ray.cluster_resources()`` counts a lost node's until the GCS drops it, and Ray Train
    would wait for it."""
    import ray

    have: dict[str, float] = {}
    alive, dead = [], []
    for node in ray.nodes():
        (alive if node["Alive"] else dead).append(node["NodeManagerAddress"])
        if node["Alive"]:
            for name, amount in node["Resources"].items():
                have[name] = have.get(name, 0) + amount
    return have, alive, dead


def describe_cluster() -> str:
    have, alive, dead = alive_resources()
    gone = f"; lost: {', '.join(dead)}" if dead else ""
    return (
        f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU on {len(alive)} alive "
        f"node(s) ({', '.join(alive)}{gone})"
    )


def _check_resources(cfg: Config) -> None:
    have, _, _ = alive_resources()
    try:
        _check_fits(cfg, have, "the Ray cluster (its alive nodes)")
    except UserError as e:
        raise failures.placement_failure(f"{e} ({describe_cluster()})") from None


def _ray_worker(config: dict) -> None:
    started_at = time.time()  # the worker's start-up phases count from here
    import ray
    import ray.train

    from addertrain import warmup
    from addertrain.worker import train_worker

    cfg = Config.model_validate(config["cfg"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    nodes.check(cfg, config["run_token"], rank, node)
    nodes.report(cfg, rank, node)
    warmup.before_training(cfg, context.get_local_rank())
    train_worker(config["cfg"], started_at)


def _fit(trainer, cfg: Config) -> None:
    """``trainer.fit()``, with a failure of the workers raised as one line (launch/failures.py):
    a worker's UserError as it was raised there."""
    from ray.train.v2.api.exceptions import TrainingFailedError

    try:
        trainer.fit()
    except SystemExit:
        # Ray Train answers Ctrl-C by aborting the run and exiting from fit(): report it as
        # an interrupt, as in the local executor.
        raise KeyboardInterrupt from None
    except TrainingFailedError as e:
        raise failures.explain(e, cfg, describe_cluster(), alive_resources()[2]) from None


def max_failures(cfg: Config, address: str | None) -> int:
    """Restarts after a failure: the recipe's, else 3 on a cluster (a node may be lost and
    replaced) and none on the embedded one (one machine: nothing to replace)."""
    if cfg.distributed.max_failures is not None:
        return cfg.distributed.max_failures
    return 3 if address or failures.on_slurm() else 0


# An elastic restart that asked for more workers than the survivors (Ray Train's count of the
# cluster still holds a lost node for a while) gives up on that placement after this long and
# asks again for the workers it then sees.
ELASTIC_PLACEMENT_S = 30.0


def placement(cfg: Config) -> tuple[float, int]:
    """(how long one placement of the worker group may wait, how many timed-out placements
    are retried). A fixed-size run waits once, replacement_timeout_s, for a replacement; an
    elastic one retries short placements within the same total, then goes on with those
    there are."""
    d = cfg.distributed
    if not d.elastic:
        return d.replacement_timeout_s, 0
    each = min(ELASTIC_PLACEMENT_S, d.replacement_timeout_s)
    return each, math.ceil(d.replacement_timeout_s / each)


def timeouts_env(cfg: Config) -> dict[str, str]:
    """Ray Train's bounds, which it hands from the driver to its controller and workers: a
    worker group is placed within placement()'s wait, and a worker whose health check
    hangs (a stopped process) is failed after step_timeout_s, not Ray's 10 minutes."""
    return {
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{placement(cfg)[0]:g}",
        "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": f"{cfg.distributed.step_timeout_s:g}",
    }


def _driver_console() -> None:
    """How Ray prints the workers' lines here, read when ray is first imported: without the
    ``(RayTrainWorker pid=...)`` prefix (rank 0's lines are the run's own; the other ranks
    name themselves, see addertrain/console.py) unless verbose, and without colour codes
    when the output is not a terminal."""
    if console.verbosity() <= 0:
        os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def run(cfg: Config, address: str | None, phases: Phases | None = None) -> None:
    """Train on the cluster; ``phases`` gets the cluster's start (addertrain/phases.py)."""
    _driver_console()
    started = time.time()
    with cluster(address, cfg):  # first: the embedded cluster must set up before ray loads
        (phases or Phases()).since("cluster", started)
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
        os.environ.update(timeouts_env(cfg))
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"cfg": cfg.to_dict(), "run_token": token},
            scaling_config=ScalingConfig(
                # elastic: as many as there are, at least min_workers (Ray Train asks for all)
                num_workers=(d.min_workers, d.workers) if d.elastic else d.workers,
                use_gpu=use_gpu,
                resources_per_worker=resources,
            ),
            # the process group's timeout bounds every gloo/NCCL collective (a hung peer)
            torch_config=TorchConfig(
                backend="nccl" if use_gpu else "gloo", timeout_s=round(d.step_timeout_s)
            ),
            # The run directory is the Ray experiment directory. No checkpoint is reported
            # to Ray Train: addertrain.checkpoint alone keeps them (docs/resume.md).
            run_config=RunConfig(
                name=run_dir.name,
                storage_path=str(run_dir.parent),
                # Timed-out placements are retried a bounded number of times (placement()):
                # Ray Train would otherwise retry them forever.
                failure_config=FailureConfig(
                    max_failures=max_failures(cfg, address),
                    controller_failure_limit=placement(cfg)[1],
                ),
                worker_runtime_env={"env_vars": worker_env_vars(cfg)},
                # Ray Train's INFO lines (placement, each failure decision with the worker's
                # traceback) are noise next to our progress; its warnings stay.
                logging_config=LoggingConfig(
                    log_level="INFO" if console.verbosity() > 0 else "WARNING"
                ),
            ),
        )
        _fit(trainer, cfg)
