"""Distillation from a frozen teacher: the loss against a hand computation, and the wiring
(a teacher export read by the workers, its cost logged, a mismatched teacher refused)."""

import math

import pytest
import torch

from addertrain import distill
from addertrain.metrics import read_records
from conftest import cli

TINY = (
    "recipes/synthetic_tiny.yaml",
    "train.max_steps=3",
    "train.eval_interval=0",
    "logging.interval_steps=1",
    "logging.progress=false",
    "logging.plots=false",
)


def test_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    student, teacher = (
        torch.randn(3, 4, dtype=torch.float64),
        torch.randn(3, 4, dtype=torch.float64),
    )
    labels = torch.tensor([0, 3, 1])
    t, alpha = 2.5, 0.7
    soft = 0.0
    hard = 0.0
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        zs = sum(math.exp(v / t) for v in s_row)
        zt = sum(math.exp(v / t) for v in t_row)
        for sv, tv in zip(s_row, t_row):
            p, q = math.exp(tv / t) / zt, math.exp(sv / t) / zs
            soft += p * math.log(p / q)
        hard -= math.log(math.exp(s_row[label]) / sum(math.exp(v) for v in s_row))
    expected = alpha * t * t * soft / 3 + (1 - alpha) * hard / 3
    assert distill.loss(student, teacher, labels, t, alpha).item() == pytest.approx(
        expected, rel=1e-12
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A CNN twin trained for a few steps; a finished run's final/ is an export."""
    runs = tmp_path_factory.mktemp("teacher")
    out = cli("launch", *TINY, "model.conv=conv", f"run.dir={runs}", "run.name=cnn")
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "cnn" / "final"


def train_losses(tmp_path, name, *overrides):
    out = cli("launch", *TINY, f"run.dir={tmp_path}", f"run.name={name}", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    return [r for r in read_records(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
def test_a_teacher_changes_the_loss_by_its_weight_alone(teacher, tmp_path):
    plain = train_losses(tmp_path, "plain")
    labels_only = train_losses(tmp_path, "alpha0", f"distill.teacher={teacher}", "distill.alpha=0")
    taught = train_losses(tmp_path, "alpha05", f"distill.teacher={teacher}", "distill.alpha=0.5")
    # alpha 0: the teacher runs (and is timed) but the step is the labels' alone, bit for bit
    assert [r["loss"] for r in labels_only] == [r["loss"] for r in plain]
    assert all(r["teacher_ms"] > 0 for r in labels_only + taught)
    assert "teacher_ms" not in plain[0]
    assert taught[0]["loss"] != plain[0]["loss"]


def test_a_teacher_for_other_inputs_is_refused_before_training(teacher, tmp_path):
    out = cli(
        "launch", *TINY, f"run.dir={tmp_path}", f"distill.teacher={teacher}", "data.image_size=8"
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "distill.teacher" in out.stderr and "data.image_size" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "synthetic-tiny").exists()
    missing = cli("launch", *TINY, f"run.dir={tmp_path}", f"distill.teacher={tmp_path / 'nope'}")
    assert missing.returncode == 2 and "distill.teacher" in missing.stderr, missing.stderr
