"""What a user sees: the run's own lines, once each, without Ray's prefixes or colour codes."""

import logging
import re
from pathlib import Path

import pytest

from addertrain import console
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "recipes/synthetic_tiny.yaml",
    "train.global_batch=16",
    "train.micro_batch=8",
    "data.image_size=8",
    "data.synthetic.train_size=64",
    "data.synthetic.val_size=32",
    "logging.interval_steps=2",
]
OURS = re.compile(r"^(step \d+/\d+ \| |eval at step \d+: |run directory: |done in \d+ s: )")


def launch(*args):
    return cli("launch", *args, timeout=600)


@pytest.mark.slow
def test_ray_run_prints_its_own_lines_and_little_else(tmp_path):
    out = launch(*TINY, f"run.dir={tmp_path}", "distributed.executor=ray", "distributed.workers=2")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    lines = [line for line in text.splitlines() if line.strip()]
    foreign = [line for line in lines if not OURS.match(line)]
    assert len(foreign) <= 5, foreign
    assert "\x1b[" not in text  # not a terminal: no colour codes
    # every progress line once (rank 0 alone speaks), in order
    assert [line.split(" |")[0] for line in lines if line.startswith("step ")] == [
        f"step {s}/8" for s in (2, 4, 6, 8)
    ]
    assert sum(line.startswith("eval at step") for line in lines) == 2


def test_quiet_prints_the_result_alone(tmp_path):
    out = launch(*TINY, f"run.dir={tmp_path}", "train.max_steps=2", "-q")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("done in"), lines


def test_other_ranks_speak_only_for_warnings(capsys, monkeypatch):
    monkeypatch.setenv(console.ENV, "0")
    try:
        console.setup(rank=1)
        console.LOG.info("a progress line")
        console.LOG.warning("a real problem")
        console.setup(rank=0)
        console.LOG.info("rank 0's line")
    finally:
        logging.getLogger("addertrain").handlers.clear()
    assert capsys.readouterr().out.splitlines() == [
        "rank 1: WARNING: a real problem",
        "rank 0's line",
    ]


def test_version():
    out = cli("--version", timeout=60)
    assert out.returncode == 0 and re.fullmatch(r"addertrain \d+\.\d+\.\d+\n", out.stdout)


def test_ray_trains_autoscaler_hint_timing_out_is_one_line_not_a_traceback(capsys):
    """Ray Train logs a timed-out hint to the autoscaler (a loaded machine) with its traceback;
    in the run's Ray workers it is one line (launch/embedded_ray.worker_setup's filter)."""
    from addertrain.launch import embedded_ray

    logger = logging.getLogger("test-autoscaler-hint")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    logger.addFilter(embedded_ray._OneLine())
    try:
        try:
            raise TimeoutError("Get timed out: some object(s) not ready.")
        except TimeoutError:
            logger.warning("Failed to send resource request for %s.", "train-1", exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert capsys.readouterr().err.splitlines() == [
        "Failed to send resource request for train-1. "
        "(TimeoutError: Get timed out: some object(s) not ready.)"
    ]
