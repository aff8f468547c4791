"""Several hosts on one machine, as network namespaces (tests/netns.py): a Ray cluster of two
nodes with token authentication, and a Slurm cluster of two slurmd, each node with its own
address; the digits job trains across them as it would across machines. Skipped only where
namespaces cannot be made (not root, no iproute2)."""

import json
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

import pytest
import torch
from safetensors.torch import load_file

from addertrain import preempt
from addertrain.metrics import read_records

from netns import Hosts, NetnsUnavailable
from slurm_cluster import ClusterError, SlurmCluster, install
from test_slurm import assert_nothing_left, job_log, submit, wait_job

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY_PORT = 6379
# The digits recipe, shortened: 6 steps of 64 images on 2 workers, checkpoints at 3 and 6.
DIGITS = ["recipes/digits.yaml", "distributed.workers=2", "train.max_steps=6",
          "train.eval_interval=0", "checkpoint.interval_steps=3", "logging.interval_steps=1",
          "logging.progress=false", "run.deterministic=true"]


@pytest.fixture(scope="module")
def hosts():
    try:
        made = Hosts(2)
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces here: {e}")
    yield made
    left = made.close()
    assert not left, f"processes left in the test namespaces: {left}"


def launch(*args, host=None, env=None, timeout=400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "addertrain.cli", "launch", *args]
    if host is not None:
        cmd = host.command(cmd)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "digits"


@pytest.fixture(scope="module")
def one_node_run(data, tmp_path_factory):
    """The reference: the same job on one node (the embedded Ray cluster)."""
    runs = tmp_path_factory.mktemp("one-node")
    out = launch(*DIGITS, f"data.root={data}", f"run.dir={runs}")
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "digits"


# -- Ray: a head node and a worker node, token authentication on -------------------------------

@contextmanager
def ray_nodes(hosts, tmp: Path):
    """``ray start`` on n0 (head) and n1, one CPU each, so each training worker gets a node;
    the token in a file only this user can read, as slurm/addertrain.sbatch does. Yields the
    client environment; stops the nodes by PID after."""
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    head = hosts[0]
    address = f"{head.ip}:{RAY_PORT}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_ADDRESS": address, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats",
              "--block"]
    nodes = []
    try:
        for i, h in enumerate(hosts):
            role = (["--head", f"--port={RAY_PORT}", "--include-dashboard=false"] if i == 0
                    else [f"--address={address}"])
            nodes.append(h.start(["ray", "start", *role, f"--node-ip-address={h.ip}",
                                  f"--temp-dir={ray_temp(h)}", *common],
                                 log=tmp / f"{h.name}.log", env=env))
            wait = head.run([sys.executable, str(ROOT / "slurm" / "wait_for_nodes.py"),
                             "--address", address, "--nodes", str(i + 1), "--timeout", "120",
                             "--watch", str(nodes[-1].pid)], env=env)
            assert wait.returncode == 0, wait.stderr + "".join(
                p.read_text(errors="replace")[-2000:] for p in tmp.glob("*.log"))
        yield env
    finally:
        for node in nodes:  # ray start --block stops its node's processes on SIGTERM
            node.terminate()
        for node in nodes:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()


def ray_temp(host) -> Path:
    return Path(f"/tmp/{host.netns}-ray")  # short: Ray's socket paths must stay under 108 bytes


def train_worker_nodes(hosts) -> dict[str, int]:
    """How many Ray Train workers each node ran: Ray names each actor's log after its class."""
    count = {}
    for h in hosts:
        logs = (ray_temp(h) / "session_latest" / "logs").glob("worker-*.out")
        count[h.name] = sum(":actor_name:RayTrainWorker" in p.read_text(errors="replace")
                            for p in logs)
    return count


@pytest.fixture(scope="module")
def two_node_run(hosts, data, tmp_path_factory):
    """The digits job launched from n0 onto the two-node cluster, which is stopped after."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    try:
        with ray_nodes(hosts, tmp) as env:
            out = launch(*DIGITS, f"data.root={data}", f"run.dir={tmp}", "--address",
                         env["RAY_ADDRESS"], host=hosts[0], env=env)
        return {"out": out, "run_dir": tmp / "digits", "workers": train_worker_nodes(hosts)}
    finally:
        for h in hosts:
            shutil.rmtree(ray_temp(h), ignore_errors=True)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def losses(run_dir: Path) -> dict[int, float]:
    records = read_records(run_dir / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.slow
def test_ray_job_across_two_nodes_matches_one_node(two_node_run, one_node_run):
    out, run_dir = two_node_run["out"], two_node_run["run_dir"]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["world_size"] == 2 and result["steps"] == 6
    # one training worker per node: the gradients crossed the namespaces' network
    assert two_node_run["workers"] == {"n0": 1, "n1": 1}
    # one set of checkpoints, written by both nodes into the one shared run directory
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000006"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000003", "step00000006"]
    assert not list(ckpts.glob("tmp-*"))
    for step in ckpts.glob("step*"):
        meta = json.loads((step / "meta.json").read_text())
        assert meta["world_size"] == 2 and all((step / f).is_file() for f in meta["files"])
    # the same training as on one node (tolerances of tests/test_distributed.py)
    assert losses(run_dir) == pytest.approx(losses(one_node_run), rel=1e-5)
    ours, theirs = final_weights(run_dir), final_weights(one_node_run)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-6), k


# -- Slurm: slurmctld on n0, a slurmd on each node; slurm/submit.sh on both ---------------------

@pytest.fixture(scope="module")
def slurm_2(hosts):
    try:
        install()
        cluster = SlurmCluster(hosts)
        cluster.start()
    except ClusterError as e:
        pytest.fail(f"cannot bring up the two-node test Slurm cluster: {e}")
    cluster.env["PATH"] = f"{VENV_BIN}{os.pathsep}{cluster.env['PATH']}"
    # Ray's temp dir on each node's own disk, as /tmp is on separate machines
    cluster.env["ADDERTRAIN_RAY_TMP"] = str(cluster.node_local)
    yield cluster
    left = cluster.stop()
    assert not left, f"Slurm daemons still running after teardown: {left}"


def running_train_workers(hosts) -> dict[str, list[int]]:
    """Ray Train worker processes alive now, per host (by the network namespace they run in)."""
    import psutil

    found = {}
    for h in hosts:
        found[h.name] = []
        for pid in h.pids():
            try:
                if "RayTrainWorker" in " ".join(psutil.Process(pid).cmdline()):
                    found[h.name].append(pid)
            except psutil.Error:
                pass
    return found


def preempt_while_paused(cluster, job: str, workers: list[int], run_dir: Path) -> None:
    """Send the job Slurm's preemption warning with its training workers stopped until the
    stop request is in the run directory: a short run cannot finish before it sees it."""
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        cluster.run("scancel", "--batch", "--signal=USR1", job)
        deadline = time.monotonic() + 60
        while not preempt.requested(run_dir):
            assert time.monotonic() < deadline, "the stop request never reached the run directory"
            time.sleep(0.1)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_slurm_job_on_two_nodes_is_preempted_and_resumes_to_the_same_weights(
        hosts, slurm_2, two_node_run, data, tmp_path):
    job = submit(slurm_2, tmp_path, str(ROOT / DIGITS[0]), "--nodes", "2", "--cpus-per-node", "1",
                 "--run-dir", str(tmp_path / "runs"), *DIGITS[1:], f"data.root={data}")
    run_dir = tmp_path / "runs" / "digits"
    metrics = run_dir / "metrics.jsonl"
    wait_job(slurm_2, job, until=lambda j: metrics.is_file() and metrics.read_text().strip())
    workers = running_train_workers(hosts)
    preempt_while_paused(slurm_2, job, [p for pids in workers.values() for p in pids], run_dir)
    wait_job(slurm_2, job, until=lambda j: j.get("Restarts") == "1")
    # wait_job releases the requeued job at once (Slurm would hold it for two minutes): first
    # let the last run's processes on both nodes end, or the restart can meet them
    assert_nothing_left(job)
    end = wait_job(slurm_2, job)
    log = job_log(tmp_path, job)
    assert end["JobState"] == "COMPLETED" and end["ExitCode"] == "0:0", f"{end}\n{log}\n{slurm_2.logs()}"
    # Ray's head on the first node, a Ray worker node on the second, a training worker on each
    assert re.search(rf"on n0 n1; Ray head {re.escape(hosts[0].ip)}:\d+", log), log
    assert {host: len(pids) for host, pids in workers.items()} == {"n0": 1, "n1": 1}
    assert "requeueing (requeue 1 of at most" in log and "(restart 1)" in log, log
    assert "run finished" in log
    assert_nothing_left(job)
    # the same weights as the uninterrupted two-node run
    ours, theirs = final_weights(run_dir), final_weights(two_node_run["run_dir"])
    assert ours.keys() == theirs.keys()
    differ = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ[:5]}"
