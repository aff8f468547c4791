"""The whole stack in one run, as a user would launch it: a recipe through the Ray executor on a
folder dataset (DALI), stopped with SIGTERM, launched again, checked to resume at the step it
checkpointed, and run to the end; then the same recipe on synthetic data, to see whether the
input pipeline limits the step rate.

    python scripts/fullstack.py --data DIR --runs DIR --out DIR --batch 64 --steps 300 \
        --sigterm-at 150 --synthetic-steps 60 RECIPE [key.path=value ...]

    python scripts/fullstack.py merge PARTS DEST     (folders of `data fake` -> one dataset)

The overrides go to every launch. Writes ``fullstack.json`` (checks, img/s per step, peak
memory, launch-to-first-step) and ``fullstack.log`` (both launches' output) into --out, prints
a summary, and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addertrain.metrics import read_records  # noqa: E402


def launch_command(recipe: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "addertrain.cli", "launch", recipe, *overrides]


def records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in read_records(path) if r["kind"] == kind] if path.exists() else []


def first_step_time(run_dir: Path, after: int) -> float | None:
    times = [r["time"] for r in records(run_dir, "train") if r["step"] > after]
    return min(times) if times else None


class Log:
    def __init__(self, path: Path):
        self.file = path.open("a")

    def run(
        self, name: str, command: list[str], stop_at: int | None, run_dir: Path, timeout: float
    ) -> tuple[int, str, float]:
        """Run one launch; with ``stop_at``, send SIGTERM once the run logged that step.
        Returns the exit code, the output and the wall-clock start."""
        self.file.write(f"=== {name}: {' '.join(command)}\n")
        self.file.flush()
        start = time.time()
        # its own process group: a time limit ends the launch with its Ray processes
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        # gpu_check.sh's section limit stops this script with SIGTERM: take the launch along
        signal.signal(
            signal.SIGTERM, lambda *_: (os.killpg(proc.pid, signal.SIGKILL), sys.exit(124))
        )
        deadline = time.monotonic() + timeout
        if stop_at is not None:
            while not any(r["step"] >= stop_at for r in records(run_dir, "train")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[fullstack] killed after the {timeout:.0f} s limit\n"
        self.file.write(out + f"=== {name}: exit {proc.returncode}\n")
        self.file.flush()
        return proc.returncode, out, start


def resumed_step(out: str) -> int | None:
    for line in out.splitlines():
        if "resumed from" in line and "at step " in line:
            return int(line.split("at step ")[1].split("/")[0])
    return None


def step_rates(run_dir: Path, batch: int, skip: int) -> list[float]:
    """img/s of each step from the time between consecutive step records, leaving out the
    first ``skip`` steps (compilation, warm-up) and steps after an evaluation or a
    checkpoint (their time is in the gap)."""
    train = records(run_dir, "train")
    busy = {r["step"] + 1 for r in records(run_dir, "eval")}
    busy |= {int(p.name[4:]) + 1 for p in (run_dir / "checkpoints").glob("step*")}
    rates = []
    for prev, cur in itertools.pairwise(train):
        if (
            cur["step"] == prev["step"] + 1
            and cur["step"] > skip
            and cur["step"] not in busy
            and cur["time"] > prev["time"]
        ):
            rates.append(batch / (cur["time"] - prev["time"]))
    return rates


def summary(rates: list[float]) -> dict:
    if not rates:
        return {"steps": 0}
    q = statistics.quantiles(rates, n=10, method="inclusive") if len(rates) > 1 else [rates[0]] * 9
    return {
        "steps": len(rates),
        "median": float(f"{statistics.median(rates):.4g}"),
        "p10": float(f"{q[0]:.4g}"),
        "p90": float(f"{q[-1]:.4g}"),
    }


def merge(parts: Path, dest: Path) -> None:
    """One ImageNet-format folder from several (``data fake`` run in parallel with different
    seeds): each file moves to the same split and class, its name prefixed with its part."""
    count = 0
    for part in sorted(p for p in parts.iterdir() if p.is_dir()):
        for f in sorted(part.glob("*/*/*")):
            split, label = f.parent.parent.name, f.parent.name
            (dest / split / label).mkdir(parents=True, exist_ok=True)
            f.rename(dest / split / label / f"{part.name}-{f.name}")
            count += 1
    print(f"merged {count} files from {parts} into {dest}")


def main() -> int:
    if sys.argv[1:2] == ["merge"]:
        m = argparse.ArgumentParser(prog="fullstack.py merge", description=merge.__doc__)
        m.add_argument("parts", type=Path)
        m.add_argument("dest", type=Path)
        a = m.parse_args(sys.argv[2:])
        merge(a.parts, a.dest)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument(
        "--data",
        help="the ImageNet-format folder (default: synthetic data, and "
        "no second run to compare with)",
    )
    p.add_argument("--runs", required=True, type=Path, help="parent of the run directories")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--sigterm-at", type=int, required=True)
    p.add_argument("--synthetic-steps", type=int, default=0)
    p.add_argument("--batch", type=int, required=True, help="train.global_batch")
    p.add_argument("--warmup-steps", type=int, default=5, help="left out of the rates")
    p.add_argument("--timeout", type=float, default=600, help="per launch, seconds")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "fullstack.log")
    common = [
        *args.overrides,
        f"run.dir={args.runs}",
        f"train.global_batch={args.batch}",
        "logging.interval_steps=1",
    ]
    real = args.runs / "real"
    source = (
        ["data.source=folder", f"data.root={args.data}"]
        if args.data
        else ["data.source=synthetic", f"data.synthetic.train_size={args.batch * 100}"]
    )
    real_cmd = launch_command(
        args.recipe, [*common, "run.name=real", *source, f"train.max_steps={args.steps}"]
    )
    checks: dict[str, bool] = {}
    rc1, _, t1 = log.run("launch 1", real_cmd, args.sigterm_at, real, args.timeout)
    checks["first launch exits 75 after SIGTERM"] = rc1 == 75
    ckpts = sorted(int(p.name[4:]) for p in (real / "checkpoints").glob("step*"))
    saved = json.loads((real / "result.json").read_text())["steps"] if rc1 == 75 else None
    rc2, out2, t2 = log.run("launch 2", real_cmd, None, real, args.timeout)
    resumed = resumed_step(out2)
    after = [r["step"] for r in records(real, "train") if r["time"] >= t2]
    checks["second launch completes"] = rc2 == 0
    checks["resumed at the step the SIGTERM checkpointed"] = (
        resumed is not None
        and resumed == saved
        and resumed >= args.sigterm_at
        and bool(ckpts)
        and resumed == ckpts[-1]
    )
    checks["steps after the resume follow on"] = resumed is not None and after == list(
        range(resumed + 1, args.steps + 1)
    )
    checks["evaluated"] = bool(records(real, "eval"))
    result = {
        "recipe": args.recipe,
        "overrides": common,
        "steps": args.steps,
        "sigterm_at": args.sigterm_at,
        "checkpointed_at": saved,
        "resumed_at": resumed,
        "checkpoints_before_resume": ckpts,
        "exit_codes": [rc1, rc2],
        "launch_to_first_step_s": {
            "cold": _seconds(first_step_time(real, 0), t1),
            "resume": _seconds(first_step_time(real, resumed or 0), t2),
        },
        "img_per_s_real": summary(step_rates(real, args.batch, args.warmup_steps)),
        "evaluations": records(real, "eval"),
    }
    done = real / "result.json"
    if done.exists():
        r = json.loads(done.read_text())
        result["peak_memory_gb"] = round(r["peak_memory_bytes"] / 1e9, 2)
        result["status"], result["wall_s"] = r["status"], r.get("wall_s")
        checks["run completed"] = r["status"] == "completed" and r["steps"] == args.steps
    rank0 = real / "workers" / "rank0.json"
    if rank0.exists():
        result["rank0"] = json.loads(rank0.read_text())
    if args.synthetic_steps and args.data:
        synth = args.runs / "synthetic"
        rc3, _, t3 = log.run(
            "synthetic",
            launch_command(
                args.recipe,
                [
                    *common,
                    "run.name=synthetic",
                    "data.source=synthetic",
                    f"data.synthetic.train_size={args.batch * args.synthetic_steps}",
                    f"train.max_steps={args.synthetic_steps}",
                    "train.eval_interval=0",
                ],
            ),
            None,
            synth,
            args.timeout,
        )
        checks["synthetic run completes"] = rc3 == 0
        result["img_per_s_synthetic"] = summary(step_rates(synth, args.batch, args.warmup_steps))
        result["launch_to_first_step_s"]["synthetic"] = _seconds(first_step_time(synth, 0), t3)
        real_rate = result["img_per_s_real"].get("median")
        synth_rate = result["img_per_s_synthetic"].get("median")
        if real_rate and synth_rate:
            result["real_over_synthetic"] = round(real_rate / synth_rate, 3)
    result["checks"] = checks
    (args.out / "fullstack.json").write_text(json.dumps(result, indent=2))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    keys = (
        "checkpointed_at",
        "resumed_at",
        "launch_to_first_step_s",
        "img_per_s_real",
        "img_per_s_synthetic",
        "real_over_synthetic",
        "peak_memory_gb",
    )
    for key in keys:
        if key in result:
            print(f"{key}: {result[key]}")
    return 0 if all(checks.values()) else 1


def _seconds(later: float | None, start: float) -> float | None:
    return None if later is None else round(later - start, 1)


if __name__ == "__main__":
    sys.exit(main())
