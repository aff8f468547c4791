"""addertrain sweep: a grid of ordinary runs as Ray Tune trials on one cluster."""

import json
from pathlib import Path

import pytest
import yaml

from addertrain import sweep
from addertrain.errors import UserError
from addertrain.metrics import read_records
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "synthetic_tiny.yaml")


def run_sweep(*args, cwd):
    return cli("sweep", RECIPE, *args, cwd=cwd, timeout=600)


def test_split_values_keeps_lists_whole():
    assert sweep.split_values("0.1, 0.2") == ["0.1", "0.2"]
    assert sweep.split_values("[0.6,1.0],[0.8,1.0]") == ["[0.6,1.0]", "[0.8,1.0]"]


@pytest.mark.parametrize(
    "items, problem",
    [
        (["optim.lr"], "must look like key.path=v1,v2"),
        (["optim.lr=0.1,,0.2"], "empty value"),
        (["optim.lr=0.1,0.1"], "repeats a value"),
        (["optim.lr=0.1", "optim.lr=0.2"], "given twice"),
        (["run.name=a,b"], "set by the sweep"),
        (["run.dir=a,b"], "takes one folder"),
    ],
)
def test_bad_grids_are_named(items, problem):
    with pytest.raises(UserError, match=problem):
        sweep.parse_grid(items)


def test_every_grid_point_is_checked_before_any_trial_starts(tmp_path):
    """The second lr is not a number: nothing runs, nothing is written."""
    out = run_sweep("optim.lr=0.1,fast", f"run.dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "trial optim.lr=fast" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_trials_on_ray_run_in_parallel_and_a_second_sweep_keeps_them(tmp_path):
    """Two Ray-executor runs at once on the sweep's embedded cluster, each an ordinary run
    directory with its own value; the same command again reruns nothing."""
    args = (
        "optim.lr=0.05,0.2",
        "train.max_steps=3",
        "logging.interval_steps=1",
        "distributed.executor=ray",
        f"run.dir={tmp_path / 'runs'}",
        "--trials-in-parallel",
        "2",
    )
    out = run_sweep(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    folder = tmp_path / "runs" / "synthetic-tiny-sweep"
    summary = json.loads((folder / "sweep.json").read_text())
    assert [t["name"] for t in summary["trials"]] == ["optim.lr-0.05", "optim.lr-0.2"]
    metrics = {}
    for trial, lr in zip(summary["trials"], (0.05, 0.2), strict=True):
        run_dir = Path(trial["run_dir"])
        assert run_dir.parent == folder and trial["status"] == "completed"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == lr
        records = read_records(run_dir / "metrics.jsonl")
        assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
        final = json.loads((run_dir / "result.json").read_text())["eval"]["top1"]
        assert trial["top1"] == final
        metrics[run_dir] = (run_dir / "metrics.jsonl").read_text()
    # the first step's lr of a cosine schedule is the recipe's: the runs differ as the grid says
    first = {
        lr: read_records(Path(t["run_dir"]) / "metrics.jsonl")[0]["lr"]
        for t, lr in zip(summary["trials"], (0.05, 0.2), strict=True)
    }
    assert first == {0.05: pytest.approx(0.05), 0.2: pytest.approx(0.2)}
    table = (folder / "sweep.md").read_text()
    assert "optim.lr-0.05" in table and "completed" in table and table in out.stdout
    assert "train.max_steps" not in table  # fixed for all trials: in sweep.json only
    assert (folder / "sweep.png").stat().st_size > 0

    again = run_sweep(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {d: (d / "metrics.jsonl").read_text() for d in metrics} == metrics
