"""``addertrain launch RECIPE [key.path=value ...]``: check everything, then start the workers.

Exit codes: 0 done, 2 bad input, 75 checkpointed and stopped after SIGTERM/SIGUSR1 (resume
with ``--resume auto``), 130 interrupted (Ctrl-C: no checkpoint is written; ``--resume auto``
continues from the last periodic one)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from addertrain import config, console, preempt, runlock
from addertrain.console import LOG
from addertrain.errors import UserError
from addertrain.metrics import MetricsLog, eval_line
from addertrain.phases import Phases, combine, summary_line

HELP = "train a recipe (YAML) with optional key.path=value overrides"


def add_arguments(p) -> None:
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/digits.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="override recipe values, e.g. optim.lr=0.05 train.precision=bf16",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps of the recipe on one device (synthetic data if the dataset "
        "is absent) with a pass/fail verdict, img/s and peak memory",
    )
    p.add_argument(
        "--address",
        help="Ray cluster to join (host:port or 'auto'); default: "
        "distributed.ray_address, else an embedded local cluster",
    )
    p.add_argument(
        "--resume",
        default="auto",
        metavar="auto|PATH|none",
        help="auto (default): continue from the run directory's latest checkpoint if "
        "there is one; PATH: start from that checkpoint (or run directory); "
        "none: a fresh start",
    )
    talk = p.add_mutually_exclusive_group()
    talk.add_argument(
        "-q", "--quiet", action="store_true", help="print only warnings, errors and the result"
    )
    talk.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print Ray's and Ray Train's information lines, with each worker's prefix",
    )
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="resume although the recipe changed KEY (a key or section, e.g. "
        "schedule.epochs); repeatable",
    )


def worker_device_type(cfg: config.Config) -> str:
    """The device type the workers will train on, known before they start."""
    if cfg.train.device != "auto":
        return cfg.train.device
    if cfg.distributed.executor == "ray":
        return "cuda" if cfg.distributed.gpus_per_worker > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def start_run_dir(cfg: config.Config) -> Path:
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    # A summary left by an earlier launch must not pass for this one's.
    (run_dir / "result.json").unlink(missing_ok=True)
    return run_dir


def choose_start(cfg: config.Config, spec: str, allow: list[str], smoke: bool) -> None:
    """Pick the checkpoint to start from and check it fits the recipe, before any worker starts."""
    from addertrain import checkpoint

    run_dir = cfg.run_dir()
    if smoke:  # a smoke run is disposable and always starts afresh
        shutil.rmtree(checkpoint.checkpoints_dir(run_dir), ignore_errors=True)
        return
    path = checkpoint.resolve(spec, run_dir)
    if path is None and spec == "auto" and cfg.checkpoint.resume:
        # the recipe names where a fresh run starts: checked as `--resume PATH` would be
        path = checkpoint.resolve(cfg.checkpoint.resume, run_dir)
    cfg.checkpoint.resume = None
    if path is None:
        return
    meta = checkpoint.verify(path)
    checkpoint.check_compatible(meta, path, cfg.to_dict(), cfg.distributed.workers, allow)
    cfg.checkpoint.resume = str(path)
    LOG.info(f"resuming from {path} (step {meta['step']})")


def check_address(cfg: config.Config, address: str | None, smoke: bool) -> None:
    """``--address`` only means something to the Ray executor: never drop it silently."""
    if address and cfg.distributed.executor == "local":
        if smoke:
            raise UserError(
                f"--address {address} joins a Ray cluster, but --smoke runs on one "
                "local device; drop --address"
            )
        raise UserError(
            f"--address {address} joins a Ray cluster, but distributed.executor=local "
            "runs the worker in this process; drop --address, or set "
            "distributed.executor=ray"
        )


def execute(cfg: config.Config, address: str | None = None, phases: Phases | None = None) -> None:
    """Run the workers to the end; ``phases`` gets the launcher's part of the start-up."""
    if cfg.distributed.executor == "local":
        from addertrain import warmup
        from addertrain.launch import local

        # this process is the worker (alone, or one rank of torchrun / srun)
        local_rank = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0"
        warmup.before_training(cfg, int(local_rank))
        local.run(cfg)
        return
    from addertrain.launch import ray_executor

    ray_executor.run(cfg, address or cfg.distributed.ray_address, phases)


def timeline(result: dict, phases: Phases, handoff: float, ended: float, wall: float) -> dict:
    """The run's phases: the launcher's, rank 0's (from its result), and between them the
    workers' start (from the handoff to rank 0's worker function, less the cluster's start)
    and the shutdown (from rank 0's summary to the end); ``untimed`` is the rest of ``wall``."""
    phases.add("workers", result["worker_started_at"] - handoff - phases.seconds.get("cluster", 0))
    phases.add("shutdown", ended - result["worker_finished_at"])
    return combine(phases.record(), result, wall)


def run(args) -> int:
    started = time.time()  # the run's wall time counts from here (Python's start-up is ~1 s)
    # every process of the run (Ray workers too) reads the verbosity from the environment
    os.environ[console.ENV] = str(-1 if args.quiet else 1 if args.verbose else 0)
    console.setup()
    cfg = config.load(args.recipe, args.overrides)
    # Workers may run in another working directory (Ray) or on another node. Absolute, not
    # resolved: resolving a symlink loop raises, and the data check names loops itself.
    cfg.run.dir = os.path.abspath(os.path.expanduser(cfg.run.dir))
    if cfg.data.root:
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    if cfg.distill.teacher:
        cfg.distill.teacher = os.path.abspath(os.path.expanduser(cfg.distill.teacher))
    notes = []
    if args.smoke:
        from addertrain import smoke

        cfg, notes = smoke.shrink(cfg)
        for note in notes:
            LOG.info(f"smoke: {note}")
    check_address(cfg, args.address, args.smoke)
    cfg.check_device(worker_device_type(cfg))
    from addertrain.distributed import launcher_rank

    if launcher_rank() != 0:  # another rank of torchrun/srun: rank 0 holds the lock
        return train(cfg, args, notes, started)
    # Nothing in the run directory is touched before the lock: a second launch into a live
    # run must not delete its stop request, summary or half-written checkpoint.
    lock = runlock.acquire(cfg.run_dir())
    try:
        return train(cfg, args, notes, started)
    except UserError:
        from addertrain import checkpoint

        # Bad input leaves no empty run directory behind (never one that existed before).
        if lock.created and checkpoint.latest(cfg.run_dir()) is None:
            lock.discard()
        raise
    finally:
        lock.release()


def train(cfg: config.Config, args, notes: list[str], started: float) -> int:
    """Everything that writes to the run directory; the caller holds its lock. ``started``:
    the launch's ``time.time()`` stamp, where its wall time begins."""
    preempt.clear(cfg.run_dir())
    preempt.install_handlers(cfg.run_dir())
    from addertrain.data.prepare import prepare_data

    phases = Phases()
    with phases.timed("dataset"):
        classes = prepare_data(cfg)
    if cfg.distill.teacher:
        import torch

        from addertrain import distill

        distill.Teacher(cfg, torch.device("cpu"))  # readable, and fits the student
    choose_start(cfg, args.resume, args.allow_change, args.smoke)
    run_dir = start_run_dir(cfg)
    if classes:
        from addertrain.data.folder import save_class_map

        save_class_map(classes, run_dir)
    LOG.info(f"run directory: {run_dir}")
    handoff = time.time()
    execute(cfg, args.address, phases)
    ended = time.time()
    wall = ended - started
    result = json.loads((run_dir / "result.json").read_text())
    result.update(
        wall_s=round(wall, 3), notes=notes, **timeline(result, phases, handoff, ended, wall)
    )
    from addertrain.distributed import launcher_rank

    if launcher_rank() == 0:  # the other ranks of torchrun or srun only read it
        from addertrain.worker import write_result

        write_result(run_dir, result)
    if result["status"] == "preempted":
        print(
            f"checkpointed at step {result['steps']} and stopped on request; continue with "
            f"--resume auto (exit code {preempt.EXIT_CODE})",
            flush=True,
        )
        LOG.info(summary_line(result))
        return preempt.EXIT_CODE
    ev = result["eval"]
    print(f"done in {wall:.0f} s: {result['steps']} steps, {eval_line(ev)}", flush=True)
    LOG.info(summary_line(result))
    if not args.smoke:
        return 0
    from addertrain import smoke

    ok, problems = smoke.verdict(MetricsLog(run_dir, True).read(), result)
    images = result["steps"] * cfg.train.global_batch
    print(
        f"smoke: {images / wall:.1f} img/s overall (startup included), peak memory "
        f"{result['peak_memory_bytes'] / 2**20:.0f} MiB on {result['device']}"
    )
    print("smoke: PASS" if ok else "smoke: FAIL: " + "; ".join(problems), flush=True)
    return 0 if ok else 1
