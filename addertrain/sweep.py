"""``addertrain sweep RECIPE key=v1,v2 [key=...]``: a grid of runs as Ray Tune trials.

Every grid point is an ordinary run: ``addertrain launch`` in a child process, with its own
run directory ``RUN_DIR/SWEEP/TRIAL`` (checkpoints, metrics, result.json), so a trial can be
inspected, reported on and resumed like any run. Tune schedules the trials (at most
``--trials-in-parallel`` at once) on one Ray cluster, the embedded one or ``--address``, and
the Ray executor's training workers are placed on the same cluster. Running the same sweep
again keeps the finished trials and resumes the others from their last checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

from addertrain import config
from addertrain.console import LOG
from addertrain.errors import UserError

HELP = (
    "run a grid of recipe overrides as Ray Tune trials, one run directory each, and "
    "compare them in one table and plot"
)

# the sweep names the trials' run directories itself
RESERVED = ("run.name",)


def add_arguments(p) -> None:
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/digits.yaml")
    p.add_argument(
        "grid",
        nargs="+",
        metavar="key.path=v1,v2",
        help="values to sweep (comma-separated; one value fixes a key for all "
        "trials); lists keep their brackets: data.crop_scale=[0.6,1.0],[0.8,1.0]",
    )
    p.add_argument(
        "--name",
        help="sweep folder under the recipe's run.dir (default: the "
        "recipe's run.name followed by -sweep)",
    )
    p.add_argument(
        "--trials-in-parallel",
        type=int,
        default=1,
        metavar="K",
        help="trials running at once (default 1; each needs the resources its recipe asks for)",
    )
    p.add_argument(
        "--address",
        help="Ray cluster to run on (host:port); default: "
        "distributed.ray_address, else an embedded local cluster",
    )


@dataclass
class Trial:
    name: str
    values: dict[str, str]
    overrides: list[str]
    run_dir: str


def split_values(text: str) -> list[str]:
    """``a,[1,2],b`` -> ``["a", "[1,2]", "b"]``: commas inside brackets belong to a value."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise UserError(
                f"sweep value {item!r} must look like key.path=v1,v2 (e.g. optim.lr=0.05,0.1)"
            )
        if key in RESERVED:
            raise UserError(
                f"{key} is set by the sweep for each trial; use --name to name the sweep folder"
            )
        if key == "run.dir" and "," in text:
            raise UserError("run.dir takes one folder: the sweep's folder is made in it")
        if key in grid:
            raise UserError(f"{key} is given twice; list all its values once: {key}=v1,v2")
        values = split_values(text)
        if "" in values:
            raise UserError(f"{item!r} has an empty value; remove the extra comma")
        if len(set(values)) < len(values):
            raise UserError(f"{item!r} repeats a value; each grid point must differ")
        grid[key] = values
    return grid


def trial_name(values: dict[str, str]) -> str:
    """Only the swept keys name a trial (``optim.lr-0.1_adder.grad-sign``)."""
    swept = values or {"base": "recipe"}
    return "_".join(
        re.sub(r"[^A-Za-z0-9.+-]+", "-", f"{k}-{v}").strip("-") for k, v in swept.items()
    )


def plan(recipe: str, grid: dict[str, list[str]], sweep_dir: Path) -> list[Trial]:
    """One trial per grid point, each checked as `launch` checks a recipe before any starts."""
    swept = [k for k, vs in grid.items() if len(vs) > 1]
    trials = []
    for combo in product(*grid.values()):
        values = dict(zip(grid, combo, strict=True))
        name = trial_name({k: values[k] for k in swept})
        overrides = [f"{k}={v}" for k, v in values.items()]
        overrides += [f"run.dir={sweep_dir}", f"run.name={name}"]
        try:
            config.load(recipe, overrides)
        except UserError as e:
            point = ", ".join(f"{k}={values[k]}" for k in swept) or "the recipe"
            raise UserError(f"trial {point}: {e}") from None
        trials.append(Trial(name, values, overrides, str(sweep_dir / name)))
    if len({t.name for t in trials}) < len(trials):
        raise UserError(
            "two grid points give the same trial folder name; make the values "
            "differ in letters or digits, not only in punctuation"
        )
    return trials


# -- one trial (runs in a Tune trial actor) ----------------------------------------------------


def _die_with_parent() -> None:
    """The child gets SIGTERM (checkpoint, exit 75) when the trial actor dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _evals(run_dir: Path) -> list[dict]:
    from addertrain.metrics import read_records

    metrics = run_dir / "metrics.jsonl"
    return [r for r in read_records(metrics) if r["kind"] == "eval"] if metrics.is_file() else []


def _outcome(run_dir: Path) -> dict:
    result = (
        json.loads((run_dir / "result.json").read_text())
        if (run_dir / "result.json").is_file()
        else {}
    )
    evals = _evals(run_dir)
    final = (result.get("eval") or {}).get("top1")
    return {
        "status": result.get("status", "not run"),
        "steps": result.get("steps"),
        "top1": final,
        "best_top1": max((r["top1"] for r in evals), default=final),
        "wall_s": result.get("wall_s"),
    }


def run_trial(config: dict) -> None:
    """Launch the trial's run (resuming it if it has a checkpoint) and report each evaluation
    to Tune as it appears in the run's metrics."""
    from ray import tune

    t = Trial(**config["trial"])
    run_dir = Path(t.run_dir)
    earlier = _outcome(run_dir)
    if earlier["status"] == "completed":  # finished in an earlier sweep
        tune.report(earlier)
        return
    command = [
        sys.executable,
        "-m",
        "addertrain.cli",
        "launch",
        config["recipe"],
        *t.overrides,
        "--resume",
        "auto",
        "-q",
    ]
    if config["address"]:
        command += ["--address", config["address"]]
    logs = Path(config["sweep_dir"]) / "logs"
    logs.mkdir(exist_ok=True)
    with (logs / f"{t.name}.log").open("a") as log:
        proc = subprocess.Popen(
            command,
            cwd=config["cwd"],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        reported, size = 0, -1
        while proc.poll() is None:
            time.sleep(1.0)
            metrics = run_dir / "metrics.jsonl"
            # a long run's metrics grow to megabytes: read them again only when they grew
            if not metrics.is_file() or metrics.stat().st_size == size:
                continue
            size = metrics.stat().st_size
            evals = _evals(run_dir)
            for r in evals[reported:]:
                tune.report({"step": r["step"], "top1": r["top1"], "status": "running"})
            reported = len(evals)
    outcome = _outcome(run_dir)
    if proc.returncode not in (0, 75):
        tail = (logs / f"{t.name}.log").read_text(errors="replace").strip().splitlines()
        outcome.update(status=f"failed (exit {proc.returncode})", error=tail[-1] if tail else "")
    tune.report(outcome)


# -- the sweep ---------------------------------------------------------------------------------


def _trial_resources(cfg: config.Config) -> dict:
    """The Ray executor's workers reserve their own resources; a local run takes the trial's."""
    d = cfg.distributed
    if d.executor == "ray":
        # Tune needs some resource in a trial's request; a CPU would be taken from the
        # training workers, 1 MiB of Ray's memory accounting is taken from nothing
        return {"memory": 2**20}
    return {"CPU": d.workers * d.cpus_per_worker, "GPU": d.workers * d.gpus_per_worker}


def _run_tune(
    trials: list[Trial],
    recipe: str,
    sweep_dir: Path,
    parallel: int,
    address: str | None,
    resources: dict,
) -> dict[str, dict]:
    # Tune's own tables repeat what the sweep prints at the end
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(run_trial, resources),
        param_space={
            "trial": tune.grid_search([asdict(t) for t in trials]),
            "recipe": recipe,
            "address": address,
            "cwd": os.getcwd(),
            "sweep_dir": str(sweep_dir),
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=parallel),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0),
    )
    grid = tuner.fit()
    return {r.config["trial"]["name"]: r.metrics for r in grid if r.config}


def table(trials: list[Trial], outcomes: dict[str, dict]) -> list[list[str]]:
    def pct(v):
        return "-" if v is None else f"{v:.2f}"

    # the swept keys; the ones fixed for every trial are in sweep.json
    keys = [k for k in trials[0].values if len({t.values[k] for t in trials}) > 1]
    rows = [["trial", *keys, "status", "final top-1", "best top-1", "wall s"]]
    for t in trials:
        o = outcomes.get(t.name) or {}
        wall = o.get("wall_s")
        rows.append(
            [
                t.name,
                *(t.values[k] for k in keys),
                str(o.get("status", "not run")),
                pct(o.get("top1")),
                pct(o.get("best_top1")),
                "-" if wall is None else f"{wall:.0f}",
            ]
        )
    return rows


def run(args) -> int:
    from addertrain import report

    if args.trials_in_parallel < 1:
        raise UserError("--trials-in-parallel must be 1 or more")
    grid = parse_grid(args.grid)
    base = config.load(args.recipe, [f"{k}={vs[0]}" for k, vs in grid.items()])
    grid.pop("run.dir", None)  # in base: where the sweep folder goes
    run_root = Path(os.path.abspath(os.path.expanduser(base.run.dir)))
    sweep_dir = run_root / (args.name or f"{base.run.name}-sweep")
    trials = plan(args.recipe, grid, sweep_dir)
    address = args.address or base.distributed.ray_address
    if address and base.distributed.executor == "local":
        raise UserError(
            f"--address {address} is for recipes with distributed.executor=ray; "
            "drop it, or set distributed.executor=ray"
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(
        json.dumps({"recipe": os.path.abspath(args.recipe), "grid": grid}, indent=2)
    )
    LOG.info(f"sweep {sweep_dir}: {len(trials)} trials, {args.trials_in_parallel} at a time")
    start = time.perf_counter()
    from addertrain.launch import ray_executor

    # the cluster must set up before ray is imported (launch/embedded_ray.py)
    with ray_executor.cluster(address, base) as joined:
        outcomes = _run_tune(
            trials,
            os.path.abspath(args.recipe),
            sweep_dir,
            args.trials_in_parallel,
            joined if base.distributed.executor == "ray" else None,
            _trial_resources(base),
        )
    rows = table(trials, outcomes)
    text = report.markdown(rows)
    (sweep_dir / "sweep.md").write_text(text + "\n")
    (sweep_dir / "sweep.json").write_text(
        json.dumps(
            {
                "recipe": os.path.abspath(args.recipe),
                "grid": grid,
                "wall_s": round(time.perf_counter() - start, 1),
                "trials": [{**asdict(t), **(outcomes.get(t.name) or {})} for t in trials],
            },
            indent=2,
        )
    )
    done = [t for t in trials if (Path(t.run_dir) / "metrics.jsonl").is_file()]
    if done:
        runs = [report.load(t.run_dir) for t in done]
        for r, t in zip(runs, done, strict=True):
            r.name = t.name
        report.draw(runs, report.rows(runs), sweep_dir / "sweep.png")
    print(text)
    print(f"\nwrote {sweep_dir / 'sweep.md'}, sweep.json and sweep.png")
    failed = [t.name for t in trials if (outcomes.get(t.name) or {}).get("status") != "completed"]
    if failed:
        print(
            f"not completed: {', '.join(failed)} (see {sweep_dir / 'logs'}; run the same "
            "command again to resume them)",
            file=sys.stderr,
        )
        return 1
    return 0
