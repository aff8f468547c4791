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

from addertrain.metrics import read_records
from conftest import cli_command, preempt_while_paused
from netns import Hosts, NetnsUnavailable
from slurm_cluster import ClusterError, SlurmCluster, install
from test_slurm import assert_nothing_left, job_log, submit, wait_job

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


@pytest.fixture(scope="module")
def two_node_run(hosts, data, tmp_path_factory):
    """The digits job launched from n0 onto the two-node cluster, which is stopped after."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    try:
        with ray_nodes(hosts, tmp) as cluster:
            out = launch(
                *DIGITS,
                f"data.root={data}",
                f"run.dir={tmp}",
                "--address",
                cluster.address,
                host=hosts[0],
                env=cluster.env,
            )
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
    # Ray Train's placement-group cleaner, without a dashboard to ask, stays quiet here too
    assert "Failed to query Ray Train Controller" not in out.stdout + out.stderr
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


@pytest.mark.slow
def test_a_lost_worker_node_is_replaced_and_the_run_ends_as_if_uninterrupted(
    hosts, data, two_node_run, tmp_path
):
    """With the defaults, Ray Train restarts the workers (distributed.max_failures) on the
    replacement node and they continue from the run's latest checkpoint to the uninterrupted
    run's weights, bit for bit."""
    code, out, _ = lose_node_1(hosts, data, tmp_path, replace=True)
    assert code == 0, out[-4000:]
    run_dir = tmp_path / "digits"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["world_size"] == 2 and result["steps"] == 6
    reference = two_node_run["run_dir"]
    assert losses(run_dir) == losses(reference)
    ours, theirs = final_weights(run_dir), final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert not [k for k in theirs if not torch.equal(ours[k], theirs[k])]


@pytest.mark.slow
def test_an_elastic_run_continues_on_the_node_it_has_left(hosts, data, two_node_run, tmp_path):
    """No replacement: with distributed.elastic the run goes on with one worker from the latest
    checkpoint, the global batch of 64 kept by accumulating 2 micro-batches of 32."""
    elastic = ("distributed.elastic=true", "distributed.min_workers=1", "checkpoint.keep_last=6")
    code, out, resumed = lose_node_1(hosts, data, tmp_path, *elastic, replace=False)
    assert code == 0, out[-4000:]
    run_dir = tmp_path / "digits"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["world_size"] == 1 and result["steps"] == 6
    ckpts = run_dir / "checkpoints"
    meta = json.loads((ckpts / "step00000006" / "meta.json").read_text())
    assert meta["world_size"] == 1
    ours, reference = losses(run_dir), losses(two_node_run["run_dir"])
    assert sorted(ours) == list(range(1, 7))
    # up to the checkpoint: the two-worker run itself
    assert {s: ours[s] for s in range(1, resumed + 1)} == {
        s: reference[s] for s in range(1, resumed + 1)
    }
    # after it: exactly what one worker resumed from that checkpoint computes (one thread, as
    # Ray gives a worker of distributed.cpus_per_worker=1)
    one = launch(
        *DIGITS,
        f"data.root={data}",
        f"run.dir={tmp_path / 'one-worker'}",
        "checkpoint.interval_steps=1",
        "distributed.executor=local",
        "distributed.workers=1",
        "--resume",
        str(run_dir / "checkpoints" / f"step{resumed:08d}"),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    alone = losses(tmp_path / "one-worker" / "digits")
    assert sorted(alone) == list(range(resumed + 1, 7))
    assert alone == {s: ours[s] for s in alone}
    ours, theirs = final_weights(run_dir), final_weights(tmp_path / "one-worker" / "digits")
    assert not [k for k in theirs if not torch.equal(ours[k], theirs[k])]


def error_line(out: str) -> str:
    """The launch's one line about its failure, and nothing like a traceback beside it."""
    lines = [ln for ln in out.splitlines() if ln.startswith("addertrain: error:")]
    assert len(lines) == 1 and "Traceback" not in out and "WorkerGroupError" not in out, out[-4000:]
    return lines[0]


@pytest.mark.slow
def test_a_lost_node_with_no_replacement_stops_in_one_line_and_the_relaunch_resumes(
    hosts, data, two_node_run, tmp_path
):
    """The defaults, n1 killed and nothing to replace it: the restart waits
    distributed.replacement_timeout_s for a node, then the launch exits 75 with one line naming
    the lost rank and node, the checkpoint and the command to continue. Relaunched at once on
    the cluster that lost n1, it refuses in one line (exit 2: not under Slurm) instead of
    waiting for the dead node; with a node back, the same command resumes from that checkpoint
    and ends bit for bit where the uninterrupted run ended."""
    run_dir = tmp_path / "digits"
    try:
        with ray_nodes(hosts, tmp_path) as cluster:
            args = node_loss_args(data, tmp_path, cluster, "distributed.replacement_timeout_s=20")
            proc, lost_after = kill_node_1_mid_run(hosts, cluster, args, tmp_path)
            killed = time.monotonic()
            out, _ = proc.communicate(timeout=400)
            stopped = time.monotonic()
            assert proc.returncode == 75, out[-4000:]
            line = error_line(out)
            # Ray Train numbers the ranks by node: n1's may be 0 or 1
            assert re.search(r"rank \d on n1 was lost", line), line
            assert "replacement_timeout_s=20" in line and "on n0" not in line, line
            step = int(re.search(r"checkpoint of step (\d+)", line)[1])
            assert step >= int(lost_after[4:]) and "continue with `addertrain launch" in line
            assert (run_dir / "checkpoints" / f"step{step:08d}").is_dir()
            assert Path(re.search(r"details in (\S+\.log)", line)[1]).is_file()

            again = launch(*args, host=hosts[0], env=cluster.env, timeout=300)
            # for docs/multinode.md (not asserted: the machine is shared)
            print(
                f"exit 75 {stopped - killed:.0f} s after the kill; relaunch refused in "
                f"{time.monotonic() - stopped:.0f} s"
            )
            assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-3000:]
            refused = error_line(again.stdout + again.stderr)
            assert "alive" in refused and hosts[1].ip in refused, refused

            cluster.start(1)  # a node comes back: the same command continues
            third = launch(*args, host=hosts[0], env=cluster.env)
    finally:
        for h in hosts:
            shutil.rmtree(ray_temp(h), ignore_errors=True)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    resumed = re.findall(r"resumed from \S+/step(\d+) at step", third.stdout + third.stderr)
    assert [int(r) for r in resumed] == [step]
    assert losses(run_dir) == losses(two_node_run["run_dir"])
    ours, theirs = final_weights(run_dir), final_weights(two_node_run["run_dir"])
    assert not [k for k in theirs if not torch.equal(ours[k], theirs[k])]


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


@pytest.mark.slow
def test_slurm_job_on_two_nodes_is_preempted_and_resumes_to_the_same_weights(
    hosts, slurm_2, two_node_run, data, tmp_path
):
    job = submit(
        slurm_2,
        tmp_path,
        str(ROOT / DIGITS[0]),
        "--nodes",
        "2",
        "--cpus-per-node",
        "1",
        "--run-dir",
        str(tmp_path / "runs"),
        *DIGITS[1:],
        f"data.root={data}",
    )
    run_dir = tmp_path / "runs" / "digits"
    metrics = run_dir / "metrics.jsonl"
    wait_job(slurm_2, job, until=lambda j: metrics.is_file() and metrics.read_text().strip())
    workers = running_train_workers(hosts)
    preempt_while_paused(
        lambda: slurm_2.run("scancel", "--batch", "--signal=USR1", job),
        [p for pids in workers.values() for p in pids],
        run_dir,
    )
    wait_job(slurm_2, job, until=lambda j: j.get("Restarts") == "1")
    # wait_job releases the requeued job at once (Slurm would hold it for two minutes): first
    # let the last run's processes on both nodes end, or the restart can meet them
    assert_nothing_left(job)
    end = wait_job(slurm_2, job)
    log = job_log(tmp_path, job)
    assert end["JobState"] == "COMPLETED" and end["ExitCode"] == "0:0", (
        f"{end}\n{log}\n{slurm_2.logs()}"
    )
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
