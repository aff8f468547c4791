"""``addertrain bench launch``: launch to first step, ours against a bare Ray start.

Ours: ``addertrain launch`` of the tiny recipe through the embedded Ray cluster (2 workers,
gloo, DeepSpeed), from the moment the command is spawned to the end of rank 0's first
optimizer step (``first_step_at`` in its result.json). The baseline: a script that starts Ray,
runs a TorchTrainer of 2 gloo workers that each build a DeepSpeed engine on a one-layer model
and take one step, timed the same way. Each runs in its own child process, one after another.

Two launches of each:

- first: the first launch after setup. ``scripts/setup.sh`` leaves a virtual environment and
  nothing else, so the caches a launch fills itself start empty: a fresh
  ``TORCH_EXTENSIONS_DIR`` (DeepSpeed's JIT-compiled ops) and ``TRITON_CACHE_DIR``. What a
  reinstall would also make cold, the OS page cache of the venv's files, is not reproduced.
- warm: the same command again, with the caches the first launch left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP = (
    "launch to first step of the tiny recipe through embedded Ray, first launch after setup "
    "and warm, against a bare Ray TorchTrainer + DeepSpeed start (table + JSON)"
)
TARGETS = {"first": 20.0, "warm": 8.0}  # seconds, issue 22
WORKERS = 2


def add_arguments(p) -> None:
    p.add_argument("--recipe", default="recipes/synthetic_tiny.yaml")
    p.add_argument("--json", default="bench_launch.json", help="where to write the results")


def launch_ours(recipe: str, root: Path, env: dict) -> dict:
    """Seconds from spawning ``addertrain launch`` to rank 0's first step, and the phases."""
    run_dir = root / "run"
    overrides = [
        f"run.dir={root}",
        "run.name=run",
        "distributed.executor=ray",
        f"distributed.workers={WORKERS}",
        "distributed.cpus_per_worker=1",
        "train.max_steps=2",
        "train.eval_interval=0",
        "logging.plots=false",
    ]
    command = [sys.executable, "-m", "addertrain.cli", "launch", recipe, *overrides, "-q"]
    spawned = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    total = time.time() - spawned
    if done.returncode != 0:
        raise RuntimeError(f"addertrain launch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads((run_dir / "result.json").read_text())
    return {
        "first_step_s": result["first_step_at"] - spawned,
        "total_s": total,
        "phases": result["phases"],
    }


def launch_bare(root: Path, env: dict) -> dict:
    """Seconds from spawning the baseline script to its rank 0's first step."""
    stamp = root / "first_step_at"
    command = [sys.executable, "-m", "addertrain.bench.launch", str(root), str(stamp)]
    spawned = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    total = time.time() - spawned
    if done.returncode != 0:
        raise RuntimeError(f"the bare start failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"first_step_s": float(stamp.read_text()) - spawned, "total_s": total}


# -- the baseline, run as ``python -m addertrain.bench.launch ROOT STAMP`` ---------------------


def _bare_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch

    model = torch.nn.Linear(8, 2)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        config={
            "train_batch_size": WORKERS,
            "train_micro_batch_size_per_gpu": 1,
            "gradient_clipping": 0.0,
        },
        dist_init_required=False,
    )
    engine.backward(engine(torch.randn(1, 8)).square().mean())
    engine.step()
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["stamp"]).write_text(repr(time.time()))


def bare_start(root: Path, stamp: Path) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="WARNING", _temp_dir=temp)
    try:
        TorchTrainer(
            _bare_worker,
            train_loop_config={"stamp": str(stamp)},
            scaling_config=ScalingConfig(num_workers=WORKERS),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="bare", storage_path=str(root / "storage")),
        ).fit()
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


# -- the command ------------------------------------------------------------------------------


def measure(recipe: str, top: Path) -> dict:
    """Both contenders, first launch then warm, each with its own caches."""
    base = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    caches = {}
    for who in ("addertrain", "bare"):
        caches[who] = {
            **base,
            "TORCH_EXTENSIONS_DIR": str(top / who / "torch_extensions"),
            "TRITON_CACHE_DIR": str(top / who / "triton"),
        }
    out: dict[str, dict] = {"addertrain": {}, "bare": {}}
    for launch in ("first", "warm"):
        for who, env in caches.items():
            root = Path(tempfile.mkdtemp(prefix=f"{who}-{launch}-", dir=top))
            if who == "addertrain":
                out[who][launch] = launch_ours(recipe, root, env)
            else:
                out[who][launch] = launch_bare(root, env)
            seconds = out[who][launch]["first_step_s"]
            print(f"  {who:10s} {launch:5s}: first step after {seconds:.1f} s", flush=True)
    return out


def report(out: dict) -> tuple[str, dict]:
    rows = [["launch to first step", "first launch after setup", "warm (second launch)"]]
    for who, title in (
        ("addertrain", "addertrain (tiny recipe, embedded Ray)"),
        ("bare", "bare Ray TorchTrainer + DeepSpeed"),
    ):
        rows.append([title, *(f"{out[who][k]['first_step_s']:.1f} s" for k in TARGETS)])
    ratios = {
        k: out["addertrain"][k]["first_step_s"] / out["bare"][k]["first_step_s"] for k in TARGETS
    }
    rows.append(["ratio (addertrain / bare)", *(f"{ratios[k]:.2f}x" for k in TARGETS)])
    met = {k: out["addertrain"][k]["first_step_s"] <= t for k, t in TARGETS.items()}
    rows.append(
        [
            "target (addertrain)",
            *(f"<= {t:.0f} s: {'met' if met[k] else 'NOT met'}" for k, t in TARGETS.items()),
        ]
    )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    for k in TARGETS:
        p = out["addertrain"][k]["phases"]
        lines.append(f"addertrain {k}: " + ", ".join(f"{n} {s:.1f} s" for n, s in p.items()))
    return "\n".join(lines), {"ratios": ratios, "targets_s": TARGETS, "met": met}


def run(args) -> int:
    import platform

    with tempfile.TemporaryDirectory(prefix="bench-launch-") as top:
        print(f"launch to first step, {WORKERS} workers, gloo, one after another:")
        out = measure(args.recipe, Path(top))
    table, summary = report(out)
    print(table)
    record = {
        **out,
        **summary,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    bare_start(Path(sys.argv[1]), Path(sys.argv[2]))
