"""Launch safety, for real: bad input inside a worker is one line and exit 2 under both
executors, one launch per run directory (a kill -9 leaves no stale lock), a failed launch
leaves no run directory behind, the embedded Ray cluster is private to the run, and a lone
worker's process group needs no TCP port."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import cli, cli_command

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/synthetic_tiny.yaml"
TINY = [
    "data.image_size=8",
    "data.synthetic.train_size=64",
    "data.synthetic.val_size=16",
    "train.global_batch=16",
    "train.micro_batch=8",
    "train.max_steps=2",
    "train.eval_interval=0",
    "logging.progress=false",
    "logging.plots=false",
]


def launch(*args, env=None, timeout=300):
    return cli("launch", *args, env=env, timeout=timeout)


def assert_one_line_error(out, *fragments):
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("addertrain: error: "), out.stderr[-2000:]
    for f in fragments:
        assert f in last


# -- bad input in a worker ---------------------------------------------------
@pytest.mark.slow
def test_worker_user_error_under_ray_is_one_line(ray_cluster, tmp_path):
    """train.device=cuda raises in the Ray worker (no CUDA here): one line, exit 2, and the
    new run directory is gone. The session's own Ray cluster is another Ray instance on the
    host, which the embedded one must not confuse with itself."""
    runs = tmp_path / "runs"
    out = launch(RECIPE, *TINY, f"run.dir={runs}", "distributed.executor=ray", "train.device=cuda")
    assert_one_line_error(out, "train.device=cuda but no CUDA device is visible")
    assert "WorkerGroupError" not in out.stdout + out.stderr
    assert "multiple active Ray instances" not in out.stdout + out.stderr
    assert not runs.exists()


def test_worker_user_error_under_the_local_executor(tmp_path):
    runs = tmp_path / "runs"
    out = launch(RECIPE, *TINY, f"run.dir={runs}", "train.device=cuda")
    assert_one_line_error(out, "train.device=cuda but no CUDA device is visible")
    assert not runs.exists()
    # into an existing run directory: refused the same way, and nothing of it is removed
    keep = runs / "synthetic-tiny" / "notes.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    out = launch(RECIPE, *TINY, f"run.dir={runs}", "train.device=cuda")
    assert_one_line_error(out, "train.device=cuda")
    assert keep.read_text() == "mine"


def test_address_with_the_local_executor_is_refused(tmp_path):
    out = launch(RECIPE, f"run.dir={tmp_path / 'runs'}", "--address", "127.0.0.1:6379")
    assert_one_line_error(out, "--address 127.0.0.1:6379", "distributed.executor=local")
    assert not (tmp_path / "runs").exists()


# -- one launch per run directory -------------------------------------------
def test_second_launch_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "synthetic-tiny"
    first = subprocess.Popen(
        cli_command("launch", RECIPE, *TINY, f"run.dir={tmp_path}"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in first.stdout:  # the lock is held from before this line to the end
            if line.startswith("run directory:"):
                break
        else:
            pytest.fail("the first launch ended early")
        first.send_signal(signal.SIGSTOP)  # alive, holding the lock, doing nothing
        # what a second launch used to delete: a stop request, a summary, a checkpoint in progress
        (run_dir / "preempt").touch()
        (run_dir / "result.json").write_text("{}")
        partial = run_dir / "checkpoints" / "tmp-step00000099"
        partial.mkdir(parents=True)
        config = (run_dir / "config.yaml").read_text()

        out = launch(RECIPE, *TINY, f"run.dir={tmp_path}", "optim.lr=0.05")
        assert_one_line_error(
            out, f"{run_dir} is in use by a running launch", f"pid {first.pid} on host"
        )
        assert (run_dir / "preempt").exists() and (run_dir / "result.json").read_text() == "{}"
        assert partial.is_dir() and (run_dir / "config.yaml").read_text() == config

        first.kill()  # SIGKILL ends a stopped process too; the kernel drops its lock
        first.wait()
        out = launch(RECIPE, *TINY, f"run.dir={tmp_path}")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert json.loads((run_dir / "result.json").read_text())["steps"] == 2
        assert not partial.exists()
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_relaunching_a_finished_run_reports_it_without_training(tmp_path):
    """What docs/resume.md promises: no step and no evaluation run again."""
    first = launch(RECIPE, *TINY, f"run.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = (tmp_path / "synthetic-tiny" / "metrics.jsonl").read_text()
    again = launch(RECIPE, *TINY, f"run.dir={tmp_path}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "synthetic-tiny" / "metrics.jsonl").read_text() == metrics
    done = [line for line in first.stdout.splitlines() if line.startswith("done in")]
    assert [line.split(": ", 1)[1] for line in done] == [
        line.split(": ", 1)[1] for line in again.stdout.splitlines() if line.startswith("done in")
    ]
    assert "eval at step" not in again.stdout


# -- the embedded Ray cluster ----------------------------------------------
PROBE = textwrap.dedent("""
    import json, os, pathlib, tempfile
    import psutil
    from addertrain.launch import embedded_ray

    with embedded_ray.cluster(num_cpus=1, num_gpus=None, logging_level="WARNING") as address:
        import ray

        @ray.remote
        def seen_by_a_worker():
            return os.environ.get("RAY_ADDRESS")

        me = psutil.Process()
        pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
        worker_address = ray.get(seen_by_a_worker.remote())
        listening = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                            if c.status == psutil.CONN_LISTEN and c.pid in pids})
        temp = [(str(p), p.stat().st_mode & 0o777)
                for p in pathlib.Path(tempfile.gettempdir()).glob("ray-*")]
        print(json.dumps({"address": address, "worker_address": worker_address,
                          "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                          "listening": listening, "temp": temp,
                          "token": os.environ.get("RAY_AUTH_TOKEN")}))
""")


def test_embedded_ray_is_private_to_the_run(tmp_path):
    home, tmp = tmp_path / "home", Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    home.mkdir()
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": str(home), "TMPDIR": str(tmp)},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["address"].startswith("127.0.0.1:")
        assert seen["worker_address"] == seen["address"]  # pinned in the workers too
        assert seen["nodes"] == ["127.0.0.1"]
        assert seen["listening"] and set(seen["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}
        assert [mode for _, mode in seen["temp"]] == [0o700]
        assert len(seen["token"]) >= 32
        assert not (home / ".ray" / "auth_token").exists()  # neither read nor written
        assert not list(tmp.glob("ray-*"))  # removed at exit
    finally:
        subprocess.run(["rm", "-rf", str(tmp)])


# -- a lone worker's process group -------------------------------------------
def test_one_rank_group_needs_no_port():
    """free_port() picked a port and released it before the group bound it (EADDRINUSE)."""
    code = textwrap.dedent("""
        import json, os
        import torch, torch.distributed as dist
        from addertrain import distributed
        world = distributed.init("cpu")
        t = torch.ones(3)
        dist.all_reduce(t)
        print(json.dumps({"world": [world.rank, world.world_size], "sum": t.tolist(),
                          "port": os.environ.get("MASTER_PORT")}))
        distributed.teardown()
    """)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"world": [0, 1], "sum": [1.0, 1.0, 1.0], "port": None}
