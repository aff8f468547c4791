"""``addertrain launch RECIPE [key.path=value ...]``: check everything, then start the workers.

Exit codes: 0 done, 2 bad input, 75 checkpointed and stopped after SIGTERM/SIGUSR1 (resume
with ``--resume auto``)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from addertrain import config, preempt
from addertrain.errors import UserError
from addertrain.metrics import MetricsLog

HELP = "train a recipe (YAML) with optional key.path=value overrides"


def add_arguments(p) -> None:
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/digits.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="override recipe values, e.g. optim.lr=0.05 train.precision=bf16")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps of the recipe on one device (synthetic data if the dataset "
                        "is absent) with a pass/fail verdict, img/s and peak memory")
    p.add_argument("--address", help="Ray cluster to join (host:port or 'auto'); default: "
                                     "distributed.ray_address, else an embedded local cluster")
    p.add_argument("--resume", default="auto", metavar="auto|PATH|none",
                   help="auto (default): continue from the run directory's latest checkpoint if "
                        "there is one; PATH: start from that checkpoint (or run directory); "
                        "none: a fresh start")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="resume although the recipe changed KEY (a key or section, e.g. "
                        "schedule.epochs); repeatable")


def prepare_data(cfg: config.Config) -> list[str] | None:
    """Build a missing dataset the recipe knows how to make, then check the layout cheaply,
    so a bad dataset stops the run before any worker starts."""
    if cfg.data.source != "folder":
        return None
    root = Path(cfg.data.root).expanduser()
    if cfg.data.prepare == "digits" and not root.exists():
        from addertrain.data.digits import prepare_digits

        print(f"preparing the digits dataset in {root}", flush=True)
        prepare_digits(root, cfg.data.image_size)
    from addertrain.data.check import quick_check
    from addertrain.data.folder import class_names

    quick_check(root, cfg.data.train_split, cfg.data.val_split)
    classes = class_names(root, cfg.data.train_split)
    if len(classes) != cfg.model.num_classes:
        raise UserError(f"{root / cfg.data.train_split} has {len(classes)} class folders but "
                        f"model.num_classes is {cfg.model.num_classes}; set model.num_classes="
                        f"{len(classes)} or point data.root at the intended dataset")
    return classes


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
    if path is None:
        return
    meta = checkpoint.read_meta(path)
    checkpoint.check_compatible(meta, path, cfg.to_dict(), cfg.distributed.workers, allow)
    checkpoint.verify_tensors(path, meta)
    cfg.checkpoint.resume = str(path)
    print(f"resuming from {path} (step {meta['step']})", flush=True)


def execute(cfg: config.Config, address: str | None = None) -> None:
    if cfg.distributed.executor == "local":
        from addertrain.launch import local

        local.run(cfg)
        return
    from addertrain.launch import ray_executor

    ray_executor.run(cfg, address or cfg.distributed.ray_address)


def run(args) -> int:
    cfg = config.load(args.recipe, args.overrides)
    # Workers may run in another working directory (Ray) or on another node.
    cfg.run.dir = str(Path(cfg.run.dir).expanduser().resolve())
    if cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    notes = []
    if args.smoke:
        from addertrain import smoke

        cfg, notes = smoke.shrink(cfg)
        for note in notes:
            print(f"smoke: {note}", flush=True)
    preempt.clear(cfg.run_dir())
    preempt.install_handlers(cfg.run_dir())
    from addertrain.engine import batch_split, check_precision

    batch_split(cfg, cfg.distributed.workers)
    check_precision(cfg, worker_device_type(cfg))
    classes = prepare_data(cfg)
    choose_start(cfg, args.resume, args.allow_change, args.smoke)
    run_dir = start_run_dir(cfg)
    if classes:
        from addertrain.data.folder import save_class_map

        save_class_map(classes, run_dir)
    print(f"run directory: {run_dir}", flush=True)
    start = time.perf_counter()
    execute(cfg, args.address)
    wall = time.perf_counter() - start
    result = json.loads((run_dir / "result.json").read_text())
    result.update(wall_s=round(wall, 1), notes=notes)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    if result["status"] == "preempted":
        print(f"checkpointed at step {result['steps']} and stopped on request; continue with "
              f"--resume auto (exit code {preempt.EXIT_CODE})", flush=True)
        return preempt.EXIT_CODE
    ev = result["eval"]
    print(f"done in {wall:.0f} s: {result['steps']} steps, top-1 {ev['top1']:.2f}%, "
          f"top-5 {ev['top5']:.2f}%", flush=True)
    if not args.smoke:
        return 0
    from addertrain import smoke

    ok, problems = smoke.verdict(MetricsLog(run_dir, True).read(), result)
    images = result["steps"] * cfg.train.global_batch
    print(f"smoke: {images / wall:.1f} img/s overall (startup included), peak memory "
          f"{result['peak_memory_bytes'] / 2**20:.0f} MiB on {result['device']}")
    print("smoke: PASS" if ok else "smoke: FAIL: " + "; ".join(problems), flush=True)
    return 0 if ok else 1
