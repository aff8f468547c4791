"""What the multi-node tests share: hosts as network namespaces (tests/netns.py), a Ray
cluster of two nodes on them with token authentication, the digits job shortened to 6 steps,
and its reference run on one node (the embedded cluster). Each test file that uses the
fixtures (tests/conftest.py: hosts, digits_root, one_node_run) gets its own hosts and
reference, so the files run side by side (pytest-xdist)."""

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from addertrain.metrics import read_records
from conftest import cli_command

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY_PORT = 6379
# The digits recipe, shortened: 6 steps of 64 images on 2 workers, checkpoints at 3 and 6.
DIGITS = [
    "recipes/digits.yaml",
    "distributed.workers=2",
    "train.max_steps=6",
    "train.eval_interval=0",
    "checkpoint.interval_steps=3",
    "logging.interval_steps=1",
    "logging.progress=false",
    "run.deterministic=true",
]


def launch(*args, host=None, env=None, timeout=400) -> subprocess.CompletedProcess:
    cmd = cli_command("launch", *args)
    if host is not None:
        cmd = host.command(cmd)
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# -- Ray: a head node and a worker node, token authentication on -------------------------------


class RayNodes:
    """``ray start`` on n0 (head) and n1, one CPU each, so each training worker gets a node;
    the token in a file only this user can read, as slurm/addertrain.sbatch does."""

    def __init__(self, hosts, tmp: Path):
        self.hosts, self.tmp = hosts, tmp
        token = tmp / "token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.address = f"{hosts[0].ip}:{RAY_PORT}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_ADDRESS": self.address,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        }
        self.nodes: list[subprocess.Popen] = []

    def start(self, i: int) -> None:
        """Start host i's node (the head for 0) and wait until the cluster counts it."""
        h = self.hosts[i]
        role = (
            ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
            if i == 0
            else [f"--address={self.address}"]
        )
        self.nodes.append(
            h.start(
                [
                    "ray",
                    "start",
                    *role,
                    f"--node-ip-address={h.ip}",
                    f"--temp-dir={ray_temp(h)}",
                    "--num-cpus=1",
                    "--object-store-memory=100000000",
                    "--disable-usage-stats",
                    "--block",
                ],
                log=self.tmp / f"{h.name}-{len(self.nodes)}.log",
                env=self.env,
            )
        )
        alive = sum(n.poll() is None for n in self.nodes)
        wait = self.hosts[0].run(
            [
                sys.executable,
                str(ROOT / "slurm" / "wait_for_nodes.py"),
                "--address",
                self.address,
                "--nodes",
                str(alive),
                "--timeout",
                "120",
                "--watch",
                str(self.nodes[-1].pid),
            ],
            env=self.env,
        )
        assert wait.returncode == 0, wait.stderr + "".join(
            p.read_text(errors="replace")[-2000:] for p in self.tmp.glob("*.log")
        )

    def stop(self) -> None:
        for node in self.nodes:  # ray start --block stops its node's processes on SIGTERM
            if node.poll() is None:
                node.terminate()
        for node in self.nodes:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()


@contextmanager
def ray_nodes(hosts, tmp: Path):
    """A head on n0 and a worker node on n1; stopped by PID after."""
    cluster = RayNodes(hosts, tmp)
    try:
        for i, _ in enumerate(hosts):
            cluster.start(i)
        yield cluster
    finally:
        cluster.stop()


def ray_temp(host) -> Path:
    return Path(f"/tmp/{host.netns}-ray")  # short: Ray's socket paths must stay under 108 bytes


def train_worker_nodes(hosts) -> dict[str, int]:
    """How many Ray Train workers each node ran: Ray names each actor's log after its class."""
    count = {}
    for h in hosts:
        logs = (ray_temp(h) / "session_latest" / "logs").glob("worker-*.out")
        count[h.name] = sum(
            ":actor_name:RayTrainWorker" in p.read_text(errors="replace") for p in logs
        )
    return count


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def losses(run_dir: Path) -> dict[int, float]:
    records = read_records(run_dir / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def node_loss_args(data, run_dir: Path, cluster, *extra: str) -> list[str]:
    """The digits job on the two-node cluster with a checkpoint every step, with the defaults
    of a cluster run (distributed.max_failures: 3)."""
    return [
        *DIGITS,
        f"data.root={data}",
        f"run.dir={run_dir}",
        "checkpoint.interval_steps=1",
        *extra,
        "--address",
        cluster.address,
    ]


def kill_node_1_mid_run(hosts, cluster, args: list[str], run_dir: Path):
    """Launch from n0; after the first checkpoint, kill -9 of everything on n1 (raylet, object
    store, training worker). Returns (the launch process, the latest checkpoint then)."""
    latest = run_dir / "digits" / "checkpoints" / "latest"
    proc = subprocess.Popen(
        hosts[0].command(cli_command("launch", *args)),
        cwd=ROOT,
        env=cluster.env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not latest.is_file():  # a checkpoint every step: the first one, then the kill
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    for pid in hosts[1].pids():
        os.kill(pid, signal.SIGKILL)
    return proc, latest.read_text()


def lose_node_1(hosts, data, run_dir: Path, *extra: str, replace: bool):
    """The node-loss job; after the kill, if ``replace``, a new node from that host, as a
    cluster manager brings a replacement. Returns (the launch's exit code, its output, the
    step it resumed from)."""
    try:
        with ray_nodes(hosts, run_dir) as cluster:
            proc, lost_after = kill_node_1_mid_run(
                hosts, cluster, node_loss_args(data, run_dir, cluster, *extra), run_dir
            )
            if replace:
                cluster.start(1)
            out, _ = proc.communicate(timeout=400)
    finally:
        for h in hosts:
            shutil.rmtree(ray_temp(h), ignore_errors=True)
    assert lost_after != "step00000006", "the run ended before the node was lost"
    resumed = re.findall(r"resumed from \S+/step(\d+) at step", out)
    assert len(resumed) == 1 and int(resumed[0]) >= int(lost_after[4:]), out[-4000:]
    return proc.returncode, out, int(resumed[0])


def error_line(out: str) -> str:
    """The launch's one line about its failure, and nothing like a traceback beside it."""
    lines = [ln for ln in out.splitlines() if ln.startswith("addertrain: error:")]
    assert len(lines) == 1 and "Traceback" not in out and "WorkerGroupError" not in out, out[-4000:]
    return lines[0]


def assert_same_training(run_dir: Path, reference: Path) -> None:
    """Every logged loss and every final weight of the two runs equal, bit for bit."""
    assert losses(run_dir) == losses(reference)
    ours, theirs = final_weights(run_dir), final_weights(reference)
    assert ours.keys() == theirs.keys()
    differ = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"weights differ from the reference run: {differ[:5]}"
