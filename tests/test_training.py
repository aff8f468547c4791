"""Real training runs through the CLI: DeepSpeed on gloo, the reference adder op, the ALR."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from addertrain import config, smoke
from addertrain.metrics import read_records
from addertrain.models import create_model
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]


def assert_reported_equals_export(run_dir: Path) -> None:
    """The evaluation a run reported is that of the model it saved, re-evaluated alone."""
    out = cli("eval", run_dir / "final", "--json", run_dir / "eval.json")
    assert out.returncode == 0, out.stderr[-3000:]
    reported = json.loads((run_dir / "result.json").read_text())["eval"]
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert evaluated["samples"] == reported["samples"]
    assert evaluated["top1"] == reported["top1"]
    assert evaluated["loss"] == pytest.approx(reported["loss"], abs=1e-6)


def launch(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "addertrain.cli", "launch", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    out = launch("recipes/synthetic_tiny.yaml", f"run.dir={runs}", "logging.interval_steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "synthetic-tiny", out


def test_loss_falls_and_evaluation_learns(tiny_run):
    run_dir, _ = tiny_run
    records = read_records(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16]
    assert evals[-1]["top1"] > 60  # 4 classes: chance is 25%
    assert evals[-1]["samples"] == 64
    # the ALR scales were applied and logged
    assert all(r["alr"]["min"] > 0 for r in records if r["kind"] == "train")


def test_logged_learning_rate_is_the_one_each_step_used(tiny_run):
    run_dir, _ = tiny_run
    records = read_records(run_dir / "metrics.jsonl")
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    # cosine from 0.1 over 16 steps, no warmup: step s (1-based) runs at 0.1 * cos-factor(s - 1)
    expected = [0.05 * (1 + math.cos(math.pi * s / 16)) for s in range(16)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_reported_evaluation_is_the_saved_models(tiny_run):
    run_dir, _ = tiny_run
    assert_reported_equals_export(run_dir)


def test_run_directory_holds_config_result_plot_and_model(tiny_run):
    run_dir, out = tiny_run
    saved = config.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved == config.load(
        ROOT / "recipes/synthetic_tiny.yaml",
        [f"run.dir={run_dir.parent}", "logging.interval_steps=1"],
    )
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 16 and result["world_size"] == 1
    assert (run_dir / "metrics.png").stat().st_size > 1000
    state = load_file(run_dir / "final" / "model.safetensors")
    model = create_model("resnet20", num_classes=4)
    model.load_state_dict(state)
    # progress lines with rate and ETA
    assert "img/s | ETA" in out.stdout


@pytest.mark.slow
def test_smoke_mode_gives_a_verdict_on_synthetic_data(tmp_path):
    out = launch("recipes/resnet18_imagenet.yaml", "--smoke", f"run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "using synthetic data" in out.stdout
    assert "smoke: PASS" in out.stdout
    assert "peak memory" in out.stdout and "img/s" in out.stdout
    result = json.loads((tmp_path / "resnet18-imagenet-smoke" / "result.json").read_text())
    assert result["steps"] == smoke.STEPS


@pytest.mark.slow
def test_bf16_training_keeps_batchnorm_statistics_in_fp32(tmp_path):
    out = launch(
        "recipes/synthetic_tiny.yaml",
        f"run.dir={tmp_path}",
        "train.precision=bf16",
        "distributed.zero_stage=1",
        "train.max_steps=4",
        "train.global_batch=16",
        "train.micro_batch=8",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "synthetic-tiny"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 4 and result["eval"]["samples"] == 64
    # the engine's own state, as checkpointed: bf16 weights, fp32 BatchNorm statistics
    state = torch.load(
        run_dir / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt", weights_only=True
    )["module"]
    assert state["stem.0.weight"].dtype == torch.bfloat16
    stats = [v for k, v in state.items() if k.endswith(("running_mean", "running_var"))]
    assert stats and all(v.dtype == torch.float32 for v in stats)


@pytest.mark.gpu
def test_fp16_skipped_steps_keep_step_schedule_and_images_in_agreement(tmp_path):
    """fp16 starts at loss scale 2**16, which the adder layers' large gradients overflow: the
    steps DeepSpeed skips still count, and the schedule follows the step counter."""
    out = launch(
        "recipes/synthetic_tiny.yaml",
        f"run.dir={tmp_path}",
        "train.precision=fp16",
        "train.device=cuda",
        "train.max_steps=6",
        "logging.interval_steps=1",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "synthetic-tiny"
    result = json.loads((run_dir / "result.json").read_text())
    train = [r for r in read_records(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert result["skipped_steps"] >= 1 and result["steps"] == 6
    assert result["images_seen"] == 6 * 32 == train[-1]["images_seen"]
    assert [r["lr"] for r in train] == pytest.approx(
        [0.05 * (1 + math.cos(math.pi * s / 6)) for s in range(6)], rel=1e-9
    )


def test_tensorboard_holds_the_logged_numbers(tiny_run):
    from tensorboardX.proto import event_pb2

    run_dir, _ = tiny_run
    values = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: length, its CRC, the event, its CRC
            length = int.from_bytes(data[pos : pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            for v in event.summary.value:
                values.setdefault(v.tag, {})[event.step] = v.simple_value
    records = read_records(run_dir / "metrics.jsonl")
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert sorted(values["train/loss"]) == sorted(train)
    for step, r in train.items():
        assert values["train/loss"][step] == pytest.approx(r["loss"], rel=1e-6)
        assert values["train/lr"][step] == pytest.approx(r["lr"], rel=1e-6)
    layer = next(iter(train[16]["alr_layers"]))
    assert values[f"train/alr_layers/{layer}/scale"][16] == pytest.approx(
        train[16]["alr_layers"][layer]["scale"], rel=1e-6
    )
    assert values["eval/top1"][16] == pytest.approx(records[-1]["top1"], rel=1e-6)


def test_a_diverging_run_stops_before_checkpointing_it(tmp_path):
    out = launch(
        "recipes/synthetic_tiny.yaml",
        f"run.dir={tmp_path}",
        "optim.lr=1e30",
        "train.max_steps=6",
        "logging.interval_steps=5",
        "train.eval_interval=0",
        "checkpoint.interval_steps=3",
    )
    assert out.returncode != 0
    assert "the training loss became non-finite at step" in out.stderr
    bad = int(re.search(r"non-finite at step (\d+);", out.stderr).group(1))
    saved = [
        int(p.name.removeprefix("step"))
        for p in (tmp_path / "synthetic-tiny" / "checkpoints").glob("step*")
    ]
    assert all(step < bad for step in saved)
