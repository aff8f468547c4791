"""``addertrain bench scaling``: 1 vs 2 workers at the same per-worker batch, through the real
Ray executor and DeepSpeed, and the share of each step spent in the adaptive learning rate.

Step times are the median gap between consecutive logged steps (every step is logged), after
a warm-up; the ALR time is what AdderSGD measured around its pass (norms, the cross-rank sum
of the per-layer squared norms when ZeRO shards the gradient, rescaling), with the number
of all-reduces it made per step (1 when the gradient is sharded, 0 when it is not).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from itertools import pairwise
from pathlib import Path

HELP = "1 vs 2 workers (same per-worker batch): step time, img/s, ALR share (table + JSON)"
WARMUP = 3


def add_arguments(p) -> None:
    p.add_argument("--recipe", default="recipes/synthetic_tiny.yaml")
    p.add_argument("--micro-batch", type=int, default=16, help="per-worker batch")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1], help="ZeRO stages to measure")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", default="bench_scaling.json", help="where to write the results")


def measure(
    recipe: str, workers: int, zero: int, micro: int, image: int, steps: int, root: Path
) -> dict:
    from addertrain import config
    from addertrain.launch import ray_executor
    from addertrain.metrics import read_records

    name = f"w{workers}-z{zero}"
    cfg = config.load(
        recipe,
        [
            f"run.dir={root}",
            f"run.name={name}",
            "distributed.executor=ray",
            f"distributed.workers={workers}",
            f"distributed.zero_stage={zero}",
            f"train.micro_batch={micro}",
            f"train.global_batch={micro * workers}",
            f"train.max_steps={steps}",
            "train.eval_interval=0",
            f"data.image_size={image}",
            f"data.synthetic.train_size={micro * workers * steps}",
            "logging.interval_steps=1",
            "logging.progress=false",
            "logging.plots=false",
        ],
    )
    cfg.run_dir().mkdir(parents=True)
    ray_executor.run(cfg, None)
    records = read_records(cfg.run_dir() / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"][WARMUP:]
    step_s = statistics.median(b["time"] - a["time"] for a, b in pairwise(train))
    alr_ms = statistics.median(r["alr"]["ms"] for r in train)
    return {
        "workers": workers,
        "zero": zero,
        "micro_batch": micro,
        "global_batch": micro * workers,
        "step_ms": 1e3 * step_s,
        "img_per_s": micro * workers / step_s,
        "alr_ms": alr_ms,
        "alr_share": alr_ms / (1e3 * step_s),
        "alr_reduced_bytes": train[-1]["alr"]["reduced_bytes"],
        "alr_all_reduces": train[-1]["alr"]["all_reduces"],
    }


def run(args) -> int:
    import os

    import ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="addertrain-scaling-") as tmp:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, max(args.workers)),
            include_dashboard=False,
            logging_level="WARNING",
            _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
        )
        try:
            for zero in args.zero:
                for w in args.workers:
                    rows.append(
                        measure(
                            args.recipe,
                            w,
                            zero,
                            args.micro_batch,
                            args.image_size,
                            args.steps,
                            Path(tmp),
                        )
                    )
        finally:
            ray.shutdown()
    base = {r["zero"]: r for r in rows if r["workers"] == min(args.workers)}
    for r in rows:
        r["speedup"] = r["img_per_s"] / base[r["zero"]]["img_per_s"]
        r["efficiency"] = r["speedup"] / (r["workers"] / min(args.workers))
    print(
        f"{'workers':>7} {'zero':>4} {'batch':>5} {'step ms':>8} {'img/s':>7} {'speedup':>7} "
        f"{'eff.':>5} {'ALR ms':>7} {'ALR %':>6} {'ALR bytes':>9} {'ALR calls':>9}"
    )
    for r in rows:
        print(
            f"{r['workers']:>7} {r['zero']:>4} {r['global_batch']:>5} {r['step_ms']:>8.1f} "
            f"{r['img_per_s']:>7.1f} {r['speedup']:>7.2f} {r['efficiency']:>5.2f} "
            f"{r['alr_ms']:>7.2f} {100 * r['alr_share']:>5.2f}% {r['alr_reduced_bytes']:>9} "
            f"{r['alr_all_reduces']:>9g}"
        )
    Path(args.json).write_text(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=2))
    print(f"results written to {args.json}")
    return 0
