"""Test settings: the CPU path runs the real Triton (interpreter), DeepSpeed (gloo) and DALI
code; :func:`cli` runs the command in a child process, for every test file."""

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # Triton kernels run under the interpreter, DeepSpeed on its CPU accelerator.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def cli_command(*args) -> list[str]:
    """The command line of ``addertrain ARGS`` from this checkout, for a child process."""
    return [sys.executable, "-m", "addertrain.cli", *map(str, args)]


def cli(
    *args, env: dict | None = None, cwd=ROOT, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``addertrain ARGS`` in a child process (what a user types, exit code included);
    ``env`` adds to this process's environment. Test files import it:
    ``from conftest import cli``."""
    return subprocess.run(
        cli_command(*args),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def preempt_while_paused(send, workers: list[int], run_dir: Path) -> None:
    """Ask a run to stop (``send()``: a signal to the launcher, a ``scancel``) with its training
    workers stopped until the request is in the run directory: a short run cannot finish first,
    however late the launcher's handler runs."""
    from addertrain import preempt

    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        send()
        deadline = time.monotonic() + 60
        while not preempt.requested(run_dir):
            assert time.monotonic() < deadline, "the stop request never reached the run directory"
            time.sleep(0.05)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


# The test files that take longest, longest first, as measured on 2 cores under pytest-xdist
# (docs/performance.md, "The test suite"); the others follow by their number of slow tests.
LONGEST = (
    "test_node_loss.py",
    "test_resume.py",
    "test_multinode.py",
    "test_gpu_script.py",
    "test_slurm.py",
    "test_distributed.py",
    "test_watchdog.py",
    "test_multinode_slurm.py",
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marks added here
def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the test Slurm cluster takes about a minute to start: its users stay out of -m "not slow"
        if "slurm" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
    # pytest-xdist hands out whole files in this order (--no-loadscope-reorder): the longest
    # first, so that they start at once and the short ones fill in around them.
    slow = collections.Counter(item.path for item in items if "slow" in item.keywords)
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(LONGEST)), -slow[item.path]))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than the cores, at least 3. The slow tests spend much of
    their time waiting on other processes (Ray, Slurm, a node's timeout), so 3 workers keep 2
    cores busy where 2 would leave them idle."""
    return max(3, (os.cpu_count() or 1) + 1)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One embedded Ray cluster for the session; executors in this process reuse it."""
    import ray

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


# -- the multi-node tests' (tests/multinode.py): module-scoped, so each file that uses them
# gets its own hosts and reference run, and the files can run side by side


@pytest.fixture(scope="module")
def hosts():
    """Two hosts n0 and n1 as network namespaces (tests/netns.py), removed after."""
    from netns import Hosts, NetnsUnavailable

    try:
        made = Hosts(2)
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces here: {e}")
    yield made
    left = made.close()
    assert not left, f"processes left in the test namespaces: {left}"


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """Where the digits job of the multi-node tests writes its dataset (once per file)."""
    return tmp_path_factory.mktemp("data") / "digits"


@pytest.fixture(scope="module")
def one_node_run(digits_root, tmp_path_factory):
    """The multi-node tests' reference: their digits job uninterrupted on one node (the
    embedded Ray cluster), the same training bit for bit as on two (test_multinode.py)."""
    from multinode import DIGITS, launch

    runs = tmp_path_factory.mktemp("one-node")
    out = launch(*DIGITS, f"data.root={digits_root}", f"run.dir={runs}")
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "digits"
