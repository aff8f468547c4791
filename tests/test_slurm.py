"""slurm/ against a real Slurm: a single-node cluster on localhost (tests/slurm_cluster.py).

One machine runs one slurmd, so the multi-node branch of the scripts (head on the first
node, workers on the others) is checked on the plan the scripts make from the node list
Slurm would give such a job; everything else runs as real jobs.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import ClusterError, SlurmCluster, install, job_pids

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
RECIPE = ROOT / "recipes" / "digits.yaml"
FINAL_WEIGHTS = Path("final") / "model.safetensors"
DONE = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@pytest.fixture(scope="session")
def slurm():
    try:
        install()
        cluster = SlurmCluster()
        cluster.start()
    except ClusterError as e:
        pytest.fail(f"cannot bring up the test Slurm cluster: {e}")
    # Jobs find ray, addertrain and python3 of this environment (sbatch exports PATH).
    cluster.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}"
    yield cluster
    left = cluster.stop()
    assert not left, f"Slurm/munge daemons still running after teardown: {left}"


def wait_job(cluster: SlurmCluster, job_id: str, timeout: float = 240, until=None) -> dict:
    """Poll until the job ends (or ``until(job)``); a requeued job is made eligible 2 s on
    (Slurm holds it for two minutes) so the test does not sit out the delay. Not at once:
    slurmd refuses a credential made in the second its previous run's was revoked in ("Job
    credential revoked"), and slurmctld then fails the job instead of starting it."""
    deadline = time.monotonic() + timeout
    hurried = None  # the restart whose start time was brought forward
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        if until is not None and until(job):
            return job
        if job.get("JobState") in DONE:
            if until is None:
                return job
            pytest.fail(
                f"job {job_id} ended ({job['JobState']}, exit {job.get('ExitCode')}) "
                "before the awaited point"
            )
        pending = job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime"
        if pending and job.get("Restarts") != hurried:
            cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+2", check=False)
            hurried = job.get("Restarts")
        time.sleep(0.5)
    pytest.fail(
        f"job {job_id} still {cluster.job(job_id).get('JobState')} after {timeout} s\n"
        f"{cluster.logs()}"
    )


def submit(cluster, cwd: Path, *args) -> str:
    r = cluster.run(str(SLURM / "submit.sh"), *args, cwd=cwd, check=False)
    assert r.returncode == 0, r.stderr
    return re.search(r"submitted job (\d+)", r.stdout).group(1)


def job_log(cwd: Path, job_id: str) -> str:
    return (cwd / f"addertrain-{job_id}.out").read_text(errors="replace")


def assert_nothing_left(job_id):
    # Ray's shutdown on a node takes seconds on an idle machine and tens of them when the
    # suite's other processes (pytest-xdist) load the 2 cores
    deadline = time.monotonic() + 120
    while (left := job_pids(job_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of job {job_id} still running: {commands(left)}"


def commands(pids: list[int]) -> dict[int, str]:
    """Each process's command line, for a failure message."""
    import psutil

    found = {}
    for pid in pids:
        try:
            found[pid] = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            found[pid] = "(ended)"
    return found


# -- the multi-node plan (no cluster needed beyond scontrol's host list expansion) --------------


def plan(cluster, **env) -> dict:
    """Run plan_cluster from slurm/cluster.sh with a fake job environment; its variables."""
    names = (
        "nodes",
        "head",
        "workers",
        "head_ip",
        "gcs_address",
        "gcs_port",
        "ray_tmp",
        "job_dir",
        "token_file",
        "head_step",
        "worker_step",
        "stop_step",
    )
    script = f"source {shlex.quote(str(SLURM / 'cluster.sh'))}; plan_cluster; " + "; ".join(
        f'printf "%s\\0" {n} "${{{n}[@]}}"; echo' for n in names
    )
    r = subprocess.run(
        ["bash", "-c", script], env={**cluster.env, **env}, capture_output=True, text=True
    )
    if r.returncode:
        return {"error": r.stderr.strip(), "rc": r.returncode}
    out = {}
    for line in r.stdout.splitlines():
        name, *values = line.split("\0")[:-1]
        out[name] = values
    return out


def flag(cmd: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {cmd}"
    return values[0]


def test_multi_node_plan_puts_head_on_first_node_and_workers_on_the_rest(slurm, tmp_path):
    p = plan(
        slurm,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu[07-09]",
        SLURM_CPUS_PER_TASK="16",
        ADDERTRAIN_HEAD_IP="10.1.0.7",
        SLURM_SUBMIT_DIR=str(tmp_path),
    )
    assert "error" not in p, p
    assert p["nodes"] == ["gpu07", "gpu08", "gpu09"]
    assert p["head"] == ["gpu07"] and p["workers"] == ["gpu08", "gpu09"]
    port = int(p["gcs_port"][0])
    assert p["gcs_address"] == [f"10.1.0.7:{port}"]

    head, worker, stop = p["head_step"], p["worker_step"], p["stop_step"]
    assert head[0] == "srun" and flag(head, "--nodelist") == "gpu07"
    assert flag(head, "--nodes") == "1" and flag(head, "--cpus-per-task") == "16"
    assert "--head" in head and flag(head, "--port") == str(port)
    assert flag(head, "--node-ip-address") == "10.1.0.7"
    assert worker[0] == "srun" and flag(worker, "--nodes") == "2"
    assert flag(worker, "--ntasks-per-node") == "1" and flag(worker, "--exclude") == "gpu07"
    assert flag(worker, "--address") == f"10.1.0.7:{port}" and "--head" not in worker
    assert flag(stop, "--nodes") == "3" and "--overlap" in stop
    ray_tmp = p["ray_tmp"][0]
    assert ray_tmp.endswith("-4242") and len(ray_tmp) < 40
    for step, action in ((head, "start"), (worker, "start"), (stop, "stop")):
        assert step[step.index(action) + 1] == ray_tmp
    assert p["token_file"][0].startswith(str(tmp_path))


def test_port_blocks_of_different_jobs_do_not_overlap(slurm):
    def ports(job_id):
        p = plan(
            slurm,
            SLURM_JOB_ID=str(job_id),
            SLURM_JOB_NODELIST="n[1-2]",
            ADDERTRAIN_HEAD_IP="10.0.0.1",
        )
        step = p["head_step"]
        fixed = [
            int(a.split("=")[1])
            for a in step
            if re.match(r"--([a-z-]+-)?port=", a) and "worker-port" not in a
        ]
        lo, hi = int(flag(step, "--min-worker-port")), int(flag(step, "--max-worker-port"))
        assert len(fixed) == len(set(fixed)) and not any(lo <= f <= hi for f in fixed)
        return set(fixed) | set(range(lo, hi + 1))

    a, b = ports(100), ports(101)
    assert a and b and not a & b
    assert all(10000 <= port <= 32767 for port in a | b)


def test_multi_node_plan_refuses_a_loopback_head(slurm):
    p = plan(slurm, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost,n2")
    assert p.get("rc") == 2
    assert "loopback" in p["error"] and "ADDERTRAIN_HEAD_IP" in p["error"]
    single = plan(slurm, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost")
    assert single["worker_step"] == [] and single["head_ip"] == ["127.0.0.1"]


def test_join_wait_names_what_it_waited_for(tmp_path):
    wait = [
        sys.executable,
        str(SLURM / "wait_for_nodes.py"),
        "--address",
        "127.0.0.1:9",
        "--nodes",
        "2",
    ]
    r = subprocess.run(wait + ["--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "timed out after 1 s waiting for the Ray head to listen at 127.0.0.1:9" in r.stderr
    gone = subprocess.Popen(["true"])
    gone.wait()
    r = subprocess.run(
        wait + ["--timeout", "60", "--watch", str(gone.pid)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and f"(pid {gone.pid}) exited" in r.stderr


def ray_node_start(tmp_path: Path, ray_tmp: Path, *ray_args: str, **env) -> subprocess.Popen:
    """ray-node.sh start as an srun task runs it, but with no `ray` on PATH: whatever the script
    lets through to ray start ends there with "ray: command not found", and no Ray starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python3").exists():
        (bin_dir / "python3").symlink_to(sys.executable)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "31337", **env}
    return subprocess.Popen(
        ["bash", str(SLURM / "ray-node.sh"), "start", str(ray_tmp), *ray_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_worker_node_waits_for_the_head_before_ray_start(tmp_path):
    # A head slower than ray start's own ~20 s of retries used to fail the worker step.
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        port = head.getsockname()[1]
        worker = ray_node_start(tmp_path, tmp_path / "rt", f"--address=127.0.0.1:{port}")
        try:
            time.sleep(1.5)
            assert worker.poll() is None, (
                f"the worker did not wait for the head: {worker.communicate()[1]}"
            )
            head.listen()
            _, err = worker.communicate(timeout=60)
        finally:
            worker.kill()
        head.settimeout(5)
        head.accept()[0].close()  # the worker's probe of the head's GCS port
    assert "ray: command not found" in err, err

    # A head that never listens: a clear error after ADDERTRAIN_JOIN_TIMEOUT, no ray start.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        worker = ray_node_start(
            tmp_path,
            tmp_path / "rt2",
            f"--address=127.0.0.1:{closed.getsockname()[1]}",
            ADDERTRAIN_JOIN_TIMEOUT="1",
        )
        _, err = worker.communicate(timeout=60)
    assert worker.returncode == 1, err
    assert re.search(
        r"addertrain-slurm: error: .+: timed out after 1 s waiting for the Ray head "
        r"to listen at 127\.0\.0\.1:\d+; raise ADDERTRAIN_JOIN_TIMEOUT",
        err,
    ), err
    assert "command not found" not in err


def foreign_dir(kind: str, path: Path) -> None:
    """A Ray temp dir made by someone else before the job: open to all, another user's, a link."""
    if kind == "world-writable":
        path.mkdir()
        path.chmod(0o777)
    elif kind == "other-owner":
        if os.geteuid():
            pytest.skip("giving a folder to another user needs root")
        path.mkdir(mode=0o700)
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    else:
        target = path.with_name("elsewhere")
        target.mkdir(mode=0o700)
        path.symlink_to(target)
    (path / "planted").write_text("not the job's")


@pytest.mark.parametrize("kind", ["world-writable", "other-owner", "symlink"])
def test_ray_node_refuses_a_temp_dir_it_does_not_own(tmp_path, kind):
    ray_tmp = tmp_path / f"ray-{os.getuid()}-31337"
    foreign_dir(kind, ray_tmp)
    node = ray_node_start(tmp_path, ray_tmp, "--head")
    _, err = node.communicate(timeout=60)
    assert node.returncode == 1, err
    assert f"Ray temp dir {ray_tmp} already exists and is not private to uid {os.getuid()}" in err
    assert "not requeued" in err and "ADDERTRAIN_RAY_TMP" in err
    assert "command not found" not in err
    # Stopping the job's Ray on the node reads and removes nothing there either.
    r = subprocess.run(
        ["bash", str(SLURM / "ray-node.sh"), "stop", str(ray_tmp)],
        env={**os.environ, "SLURM_JOB_ID": "31337"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ray_tmp.iterdir()) == ["planted"]


def test_ray_node_makes_its_temp_dir_private(tmp_path):
    ray_tmp = tmp_path / "ray-private"
    node = ray_node_start(tmp_path, ray_tmp, "--head")
    _, err = node.communicate(timeout=60)
    # Ray itself makes its temp dir world-writable: it gets a folder inside this one.
    assert "ray: command not found" in err, err
    assert stat.S_IMODE(ray_tmp.stat().st_mode) == 0o700
    assert ray_tmp.stat().st_uid == os.getuid()


@pytest.mark.parametrize(
    "gpus, overrides, message",
    [
        (None, ["distributed.zero_stage=3"], "distributed.zero_stage=3 is not supported"),
        # The digits recipe's Ray workers have no GPU, whatever the login node has.
        (None, ["train.precision=fp16"], "train.precision=fp16 needs a CUDA device"),
        ("0", ["distributed.executor=local", "train.precision=fp16"], "needs a CUDA device"),
        ("1", ["train.precision=fp16", "distributed.gpus_per_worker=1"], None),
        ("2", ["distributed.executor=local", "train.precision=fp16"], None),
        (
            None,
            ["train.micro_batch=16", "distributed.workers=3"],
            "cannot be split|must be a multiple",
        ),
    ],
    ids=[
        "zero3",
        "fp16-cpu-workers",
        "fp16-local-no-gpu",
        "fp16-gpu-workers",
        "fp16-local-gpu",
        "batch-split",
    ],
)
def test_check_recipe_runs_the_checks_launch_runs_before_workers_start(gpus, overrides, message):
    cmd = [sys.executable, str(SLURM / "check_recipe.py")]
    if gpus is not None:
        cmd += ["--gpus-per-node", gpus]
    r = subprocess.run(cmd + [str(RECIPE), *overrides], capture_output=True, text=True, timeout=120)
    if message is None:
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"addertrain: error: .*(" + message + ")", lines[0]), lines


def test_submit_checks_the_recipe_before_queueing(slurm, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run: {name: check}\n")
    r = slurm.run(str(SLURM / "submit.sh"), str(recipe), "optim.lrr=0.1", cwd=tmp_path, check=False)
    assert r.returncode == 2 and "unknown key optim.lrr" in r.stderr, r.stderr
    r = slurm.run(
        str(SLURM / "submit.sh"), str(tmp_path / "missing.yaml"), cwd=tmp_path, check=False
    )
    assert r.returncode == 2 and "missing.yaml does not exist" in r.stderr
    r = slurm.run(
        str(SLURM / "submit.sh"), str(recipe), "train.precision=fp16", cwd=tmp_path, check=False
    )
    assert r.returncode == 2 and "train.precision=fp16 needs a CUDA device" in r.stderr, r.stderr
    r = slurm.run(
        str(SLURM / "submit.sh"),
        str(recipe),
        "--gpus-per-node",
        "1",
        "train.precision=fp16",
        "--dry-run",
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    r = slurm.run(
        str(SLURM / "submit.sh"),
        str(recipe),
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--time",
        "1:00:00",
        "--dry-run",
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout)
    assert cmd[0] == "sbatch" and "--nodes=2" in cmd and "--gpus-per-node=2" in cmd
    assert "--time=1:00:00" in cmd and "--signal=B:USR1@300" in cmd
    assert cmd[-2:] == ["distributed.workers=4", "distributed.gpus_per_worker=1"]
    assert not slurm.run("squeue", "-h").stdout.strip()


# -- real jobs: the digits recipe on 2 CPU workers -----------------------------------------------


def digits_args(cwd: Path) -> list[str]:
    # Each job gets half of the test node, so the two runs below share it at the same time.
    return [
        str(RECIPE),
        "--cpus-per-node",
        "2",
        "--run-dir",
        str(cwd / "runs"),
        "distributed.workers=2",
        "train.max_steps=24",
        "checkpoint.interval_steps=8",
        "logging.interval_steps=2",
        f"data.root={cwd / 'digits-data'}",
        "run.name=digits",
    ]


def token_path(cwd: Path, job_id: str) -> Path:
    return cwd / ".addertrain-slurm" / f"job-{job_id}" / "ray_token"


@pytest.fixture(scope="module")
def digits_jobs(slurm, tmp_path_factory):
    """Two digits runs at once on the one node, each its own job and Ray cluster: the
    reference runs start to finish, the other gets the preemption warning mid-run."""
    jobs = {}
    for name in ("reference", "preempted"):
        cwd = tmp_path_factory.mktemp(name)
        jobs[name] = {
            "cwd": cwd,
            "id": submit(slurm, cwd, *digits_args(cwd)),
            "run_dir": cwd / "runs" / "digits",
        }
    ref, pre = jobs["reference"], jobs["preempted"]

    metrics = pre["run_dir"] / "metrics.jsonl"
    wait_job(slurm, pre["id"], until=lambda job: metrics.is_file() and metrics.read_text().strip())
    # Mid-run: both clusters are up, each with its own token.
    for job in (ref, pre):
        job["state_mid_run"] = slurm.job(job["id"]).get("JobState")
        token = token_path(job["cwd"], job["id"])
        job["token"] = token.read_text()
        job["modes"] = (
            stat.S_IMODE(token.stat().st_mode),
            stat.S_IMODE(token.parent.stat().st_mode),
        )
        ray_tmp = Path(f"/tmp/ray-{os.getuid()}-{job['id']}")
        job["ray_tmp"] = (
            stat.S_IMODE(ray_tmp.stat().st_mode),
            ray_tmp.stat().st_uid,
            (ray_tmp / "ray" / "session_latest").exists(),
        )
    slurm.run("scancel", "--batch", "--signal=USR1", pre["id"])
    wait_job(slurm, pre["id"], until=lambda job: job.get("Restarts") == "1")
    for job in (ref, pre):
        job["end"] = wait_job(slurm, job["id"])
        job["log"] = job_log(job["cwd"], job["id"])
    return jobs


@pytest.mark.slow
def test_digits_job_completes_with_checkpoints_and_metrics(digits_jobs):
    ref = digits_jobs["reference"]
    job, log, run_dir = ref["end"], ref["log"], ref["run_dir"]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert job["Restarts"] == "0"
    assert (run_dir / "metrics.jsonl").read_text().splitlines(), "metrics.jsonl is empty"
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file(), f"no published checkpoint: {sorted(map(str, run_dir.rglob('*')))}"
    meta = json.loads((latest.parent / latest.read_text().strip() / "meta.json").read_text())
    assert meta["step"] > 0
    # addertrain keeps the checkpoints' books; Ray Train keeps no second list of them
    assert not (run_dir / "checkpoint_manager_snapshot.json").exists()
    assert (run_dir / FINAL_WEIGHTS).is_file()
    assert "Ray nodes joined" in log and "run finished" in log
    assert not token_path(ref["cwd"], ref["id"]).parent.exists(), "token folder left behind"
    assert_nothing_left(ref["id"])


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_to_the_same_weights(digits_jobs):
    import torch
    from safetensors.torch import load_file

    pre, ref = digits_jobs["preempted"], digits_jobs["reference"]
    job, log = pre["end"], pre["log"]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert job["Restarts"] == "1"
    assert "SIGUSR1" in log and "requeueing (requeue 1 of at most 10)" in log
    assert "(restart 1)" in log and "run finished" in log
    assert_nothing_left(pre["id"])

    ours = load_file(pre["run_dir"] / FINAL_WEIGHTS)
    theirs = load_file(ref["run_dir"] / FINAL_WEIGHTS)
    assert ours.keys() == theirs.keys()
    differ = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ[:5]}"


@pytest.mark.slow
def test_two_jobs_on_one_node_keep_their_own_cluster_and_token(digits_jobs):
    ref, pre = digits_jobs["reference"], digits_jobs["preempted"]
    assert ref["state_mid_run"] == pre["state_mid_run"] == "RUNNING"
    heads = [re.search(r"Ray head ([\d.]+:\d+)", j["log"]).group(1) for j in (ref, pre)]
    assert heads[0] != heads[1]
    for job in (ref, pre):
        # readable by the job's user only, never printed
        assert job["modes"] == (0o600, 0o700)
        # Ray's sockets live in a folder only the job's user can enter
        assert job["ray_tmp"] == (0o700, os.getuid(), True)
        assert len(job["token"]) == 64
        assert ref["token"] not in job["log"] and pre["token"] not in job["log"]
    assert ref["token"] != pre["token"]


def test_requeue_cap_ends_the_job(slurm, tmp_path):
    # Warned while Ray is still starting: the run never starts, there is nothing to lose,
    # and with no requeues left the job ends with the requeue code instead of looping.
    job_id = submit(
        slurm,
        tmp_path,
        str(RECIPE),
        "--cpus-per-node",
        "2",
        "--max-requeues",
        "0",
        f"run.dir={tmp_path / 'runs'}",
    )
    log = tmp_path / f"addertrain-{job_id}.out"
    wait_job(
        slurm,
        job_id,
        timeout=60,
        until=lambda job: log.is_file() and "(restart 0)" in log.read_text(),
    )
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    job = wait_job(slurm, job_id, timeout=120)
    text = log.read_text()
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "75:0", text
    assert job["Restarts"] == "0"
    assert "not requeued: already requeued 0 times (ADDERTRAIN_MAX_REQUEUES=0)" in text
    assert_nothing_left(job_id)


def test_job_refuses_a_ray_temp_dir_made_by_someone_else(slurm, tmp_path):
    # The job ID is known only once queued: hold the job, plant the folder, release it.
    rt = tmp_path / "rt"
    rt.mkdir()
    r = slurm.run(
        "sbatch",
        "--parsable",
        "--hold",
        "--cpus-per-task=2",
        str(SLURM / "addertrain.sbatch"),
        str(RECIPE),
        f"run.dir={tmp_path / 'runs'}",
        cwd=tmp_path,
        env={**slurm.env, "ADDERTRAIN_RAY_TMP": str(rt)},
    )
    job_id = r.stdout.strip().split(";")[0]
    ray_tmp = rt / f"ray-{os.getuid()}-{job_id}"
    foreign_dir("world-writable", ray_tmp)
    slurm.run("scontrol", "release", job_id)
    job = wait_job(slurm, job_id, timeout=120)
    log = job_log(tmp_path, job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "1:0", log
    assert job["Restarts"] == "0"
    assert f"Ray temp dir {ray_tmp} already exists and is not private" in log, log
    assert "Ray did not start on every node (error above); not requeued" in log
    assert "Traceback" not in log and "Ray nodes joined" not in log
    assert sorted(p.name for p in ray_tmp.iterdir()) == ["planted"]
    assert_nothing_left(job_id)


@pytest.mark.parametrize(
    "bad, message, ray_started",
    [
        # caught by the batch script before any Ray process starts
        ("optim.lrr=0.1", "unknown key optim.lrr", False),
        # launch's engine checks, also run by the batch script before Ray starts
        ("distributed.zero_stage=3", "distributed.zero_stage=3 is not supported", False),
        # caught by addertrain launch on the running cluster
        ("data.root={tmp}/no-such-dataset", "no-such-dataset", True),
    ],
    ids=["recipe", "engine", "dataset"],
)
def test_bad_input_fails_fast_and_is_not_requeued(slurm, tmp_path, bad, message, ray_started):
    # Straight to sbatch: submit.sh would refuse the recipe typo before queueing.
    r = slurm.run(
        "sbatch",
        "--parsable",
        "--cpus-per-task=2",
        str(SLURM / "addertrain.sbatch"),
        str(RECIPE),
        bad.format(tmp=tmp_path),
        "data.prepare=null",
        f"run.dir={tmp_path / 'runs'}",
        cwd=tmp_path,
    )
    job_id = r.stdout.strip().split(";")[0]
    job = wait_job(slurm, job_id, timeout=120)
    log = job_log(tmp_path, job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", log
    assert job["Restarts"] == "0"
    assert re.search(r"addertrain: error: .*" + re.escape(message), log), log
    assert "not requeued" in log and "Traceback" not in log
    assert ("Ray nodes joined" in log) == ray_started
    assert_nothing_left(job_id)
