"""ZeRO 1 and 2 through kill -9 and resume: 2 ranks under torchrun (the local executor as one
rank of an external launcher), the whole job killed mid-run, then launched again; it ends
bitwise equal to an uninterrupted run. Each rank holds only its own partition of the
optimizer state, and the ALR's norms are summed across ranks in the step, so both are in play.
"""

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from test_resume import assert_same_weights, losses, resumed_step, train_steps, wait_for_step

ROOT = Path(__file__).resolve().parents[1]
# 8 steps of 16 images on 2 ranks, checkpoints every 3 steps; killed between 3 and 6.
ARGS = [
    "recipes/synthetic_tiny.yaml",
    "data.image_size=8",
    "data.synthetic.train_size=128",
    "train.global_batch=16",
    "train.micro_batch=8",
    "train.max_steps=8",
    "train.eval_interval=0",
    "run.deterministic=true",
    "checkpoint.interval_steps=3",
    "checkpoint.keep_last=5",
    "logging.interval_steps=1",
    "logging.progress=false",
    "distributed.executor=local",
    "distributed.workers=2",
]
KILL_AFTER = 4


def torchrun(*args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "addertrain.cli",
        "launch",
        *ARGS,
        *args,
    ]


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(*args), cwd=ROOT, capture_output=True, text=True, timeout=400)


def kill_9(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as when a node dies (torchrun
    starts each rank in a session of its own), and wait until they have all exited: rank 0
    holds the run directory's lock until then."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        p.kill()
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"still alive after SIGKILL: {alive}"


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_zero_kill_9_then_resume_gives_the_same_weights(tmp_path, zero):
    common = (f"distributed.zero_stage={zero}", f"run.dir={tmp_path}")
    ref = run(*common, "run.name=ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    args = (*common, "run.name=killed")
    proc = subprocess.Popen(
        torchrun(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for_step(proc, tmp_path / "killed", KILL_AFTER)
    finally:
        kill_9(proc.pid)
    assert not (tmp_path / "killed" / "result.json").exists()
    out = run(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert resumed_step(out.stdout) == 3
    assert_same_weights(tmp_path / "killed", tmp_path / "ref")
    assert train_steps(tmp_path / "killed") == list(range(1, 9))
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")
