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


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marks added here
def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the test Slurm cluster takes about a minute to start: its users stay out of -m "not slow"
        if "slurm" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
    # The files with the most slow tests first: pytest-xdist hands out whole files in this
    # order (--no-loadscope-reorder), so the longest start at once and the rest fill in.
    slow = collections.Counter(item.path for item in items if "slow" in item.keywords)
    items.sort(key=lambda item: -slow[item.path])


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
