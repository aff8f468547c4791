"""Slurm across hosts as network namespaces (tests/netns.py): slurmctld on n0, a slurmd on
each node, slurm/submit.sh on both; the digits job is preempted, requeued and resumes to the
uninterrupted run's weights (the one-node reference, equal to the two-node run:
test_multinode.py)."""

import os
import re
import time

import pytest

from conftest import preempt_while_paused
from multinode import (
    DIGITS,
    ROOT,
    VENV_BIN,
    assert_same_training,
)
from slurm_cluster import ClusterError, SlurmCluster, install
from test_slurm import assert_nothing_left, job_log, submit, wait_job


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
    hosts, slurm_2, one_node_run, digits_root, tmp_path
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
        f"data.root={digits_root}",
    )
    run_dir = tmp_path / "runs" / "digits"
    metrics = run_dir / "metrics.jsonl"
    # The first step's record, looked for every 20 ms: the 5 steps after it can take a third
    # of a second, less than one round of wait_job's scontrol polling, and the stop request
    # must reach the run before its last step.
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert time.monotonic() < deadline, f"no step logged within 240 s: {slurm_2.job(job)}"
        time.sleep(0.02)
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
    # the same training as the uninterrupted run
    assert_same_training(run_dir, one_node_run)
