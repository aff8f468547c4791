"""``addertrain report``: runs overlaid in one PNG and one table, finished, running, preempted,
and bad input. Run directories are written by hand here, and one comes from a real tiny run."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from addertrain import opcount, phases, report
from addertrain.cli import main
from addertrain.metrics import MetricsLog, read_records
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ("blocks.0.conv1", "blocks.0.conv2", "head.fc")


def write_run(
    root: Path, name: str, conv: str = "adder", steps=(2, 4, 6), result=None, tail: str = ""
) -> Path:
    """A run directory as launch and the trainer leave it: config.yaml, metrics.jsonl (a train
    record per step, an evaluation at steps 4 and 6) and, once ended, result.json."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {
        "run": {"name": name},
        "data": {"image_size": 16, "channels": 3},
        "model": {"arch": "resnet20", "conv": conv, "num_classes": 4},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for step in steps:
        record = {
            "kind": "train",
            "time": 1000.0 + step,
            "step": step,
            "loss": 2.0 / step,
            "lr": 0.1 / step,
            "img_per_s": 100.0 * step,
            "images_seen": 32 * step,
            "skipped_steps": 0,
        }
        if conv == "adder":
            record["alr_layers"] = {
                n: {"scale": 10.0 * step * (i + 1), "grad_norm": 0.1}
                for i, n in enumerate(LAYERS[:2])
            }
        lines.append(record)
        if step in (4, 6):
            lines.append(
                {
                    "kind": "eval",
                    "time": 1000.5 + step,
                    "step": step,
                    "loss": 1.0 / step,
                    "top1": 50.0 + step + (conv == "conv"),
                    "top5": None,
                    "samples": 64,
                }
            )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    if result is not None:
        (run_dir / "result.json").write_text(json.dumps(result))
    return run_dir


def table(text: str) -> dict[str, list[str]]:
    """The markdown table printed by report, as {row title: [one cell per run]}."""
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    return {r[0]: r[1:] for r in rows if not r[0].startswith("-")}


def test_two_runs_are_overlaid_in_one_png_and_one_table(tmp_path, capsys):
    adder = write_run(tmp_path, "twin-adder", result={"status": "completed", "wall_s": 12.3})
    conv = write_run(tmp_path, "twin-conv", conv="conv", result={"status": "completed"})
    png, md = tmp_path / "out.png", tmp_path / "out.md"
    assert main(["report", str(adder), str(conv), "--out", str(png), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 20_000
    t = table(out)
    assert t[""] == ["twin-adder", "twin-conv"]
    assert t["model"] == ["resnet20 adder", "resnet20 conv"]
    assert t["status"] == ["completed", "completed"]
    assert t["steps"] == ["6", "6"] and t["images seen"] == ["192", "192"]
    assert t["final top-1"] == ["56.00%", "57.00%"] and t["final top-5"] == ["n/a", "n/a"]
    assert t["evaluated at step"] == ["6", "6"] and t["img/s (median)"] == ["400.0", "400.0"]
    assert t["wall time"] == ["12 s", "-"]
    spec = opcount.ModelSpec("resnet20", 4, 16, 3)
    assert t["#Mul / image"] == [
        opcount.human(opcount.cost(spec, c).mul) for c in ("adder", "conv")
    ]
    assert t["#Add / image"] == [
        opcount.human(opcount.cost(spec, c).add) for c in ("adder", "conv")
    ]
    assert table(md.read_text()) == t


def test_alr_scales_are_read_per_layer_in_order(tmp_path):
    run = report.load(str(write_run(tmp_path, "a")))
    series = report.alr_series(run)
    assert list(series) == list(LAYERS[:2])
    assert series["blocks.0.conv2"] == ([2, 4, 6], [40.0, 80.0, 120.0])
    assert report.alr_series(report.load(str(write_run(tmp_path, "c", conv="conv")))) == {}


def test_a_running_run_is_reported_without_its_half_written_line(tmp_path, capsys):
    running = write_run(tmp_path, "live", steps=(2, 4), tail='{"kind": "train", "st')
    (running / "launch.lock").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"})
    )
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stopped = write_run(tmp_path, "killed", steps=(2,))
    (stopped / "launch.lock").write_text(
        json.dumps({"pid": int(dead), "host": socket.gethostname()})
    )
    preempted = write_run(tmp_path, "preempted", result={"status": "preempted", "steps": 6})
    assert (
        main(
            ["report", str(running), str(stopped), str(preempted), "--out", str(tmp_path / "r.png")]
        )
        == 0
    )
    t = table(capsys.readouterr().out)
    assert t["status"] == ["running", "unfinished", "preempted"]
    assert t["steps"] == ["4", "2", "6"]
    assert t["final top-1"] == ["54.00%", "-", "56.00%"]


def test_runs_of_the_same_name_are_told_apart_by_path(tmp_path, capsys):
    a = write_run(tmp_path / "one", "same")
    b = write_run(tmp_path / "two", "same")
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "r.png")]) == 0
    assert table(capsys.readouterr().out)[""] == [str(a), str(b)]


@pytest.mark.parametrize(
    "case,words",
    [
        ("missing", "does not exist"),
        ("empty dir", "has no metrics.jsonl"),
        ("damaged line", "metrics.jsonl line 2 is not a JSON record"),
        ("not a record", "line 1 is not a metrics record"),
        ("damaged result", "result.json"),
        ("out folder missing", "folder"),
        ("out not png", "must name a .png file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, words):
    run_dir, out = tmp_path / "run", tmp_path / "r.png"
    if case == "empty dir":
        run_dir.mkdir()
    elif case in ("damaged line", "not a record", "damaged result"):
        write_run(tmp_path, "run")
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        if case == "damaged line":
            lines[1] = lines[1][:20]
        if case == "not a record":
            lines[0] = "[1, 2]"
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        if case == "damaged result":
            (run_dir / "result.json").write_text('{"status": "comp')
    elif case.startswith("out"):
        write_run(tmp_path, "run")
        out = tmp_path / "nowhere" / "r.png" if case == "out folder missing" else tmp_path / "r.jpg"
    assert main(["report", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("addertrain: error:") and words in err and err.count("\n") == 1
    assert not out.exists()


TINY = [
    "data.image_size=8",
    "data.synthetic.train_size=64",
    "data.synthetic.val_size=16",
    "train.global_batch=16",
    "train.micro_batch=8",
    "logging.interval_steps=1",
    "logging.progress=false",
    "checkpoint.keep_best=0",
]


@pytest.mark.slow
def test_report_reads_a_real_run(tmp_path):
    launched = cli(
        "launch",
        "recipes/synthetic_tiny.yaml",
        *TINY,
        f"run.dir={tmp_path}",
        "run.name=real",
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    run_dir = tmp_path / "real"
    out = cli("report", run_dir, "--out", "real.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "real.png").read_bytes().startswith(PNG_MAGIC)
    result = json.loads((run_dir / "result.json").read_text())
    t = table(out.stdout)
    assert t["status"] == ["completed"] and t["steps"] == [str(result["steps"])]
    assert t["final top-1"] == [f"{result['eval']['top1']:.2f}%"]
    assert t["wall time"] == [f"{result['wall_s']:.0f} s"]
    # where the time went: the console's summary line, then a row per phase, adding up to
    # the wall time with "untimed" the rest
    assert phases.summary_line(result) in launched.stdout + launched.stderr
    assert {"workers", "engine", "first_step", "training", "evaluation"} <= set(result["phases"])
    assert sum(result["phases"].values()) == pytest.approx(result["wall_s"], abs=0.01)
    assert result["phase_counts"]["training"] == result["steps"] - 1
    for name, seconds in result["phases"].items():
        label = phases.LABELS.get(name, name)
        assert t[f"phase {label}"] == [phases.describe(name, seconds, result["phase_counts"])]
    # every adder layer of the ResNet-20 (18 in the blocks, 2 shortcuts), at every logged step
    series = report.alr_series(report.load(str(run_dir)))
    assert len(series) == 20
    assert all(steps == list(range(1, result["steps"] + 1)) for steps, _ in series.values())


def test_a_reader_polling_a_live_log_sees_only_whole_records(tmp_path):
    """Records longer than a file buffer (the per-layer ALR numbers of a ResNet-50) are read
    while they are being appended, as launch's tests and `report` do during a run."""
    log = MetricsLog(tmp_path, enabled=True)
    layers = {f"layer{i}": {"scale": 0.123456789, "grad_norm": 1.23456789} for i in range(400)}
    count = 60
    writer = threading.Thread(
        target=lambda: [log.write("train", step=s, alr_layers=layers) for s in range(count)]
    )
    writer.start()
    seen = []
    while writer.is_alive():
        if log.path.exists():
            seen.append(len(read_records(log.path)))
    writer.join()
    assert len(json.dumps(layers)) > 8192
    assert seen == sorted(seen) and [r["step"] for r in log.read()] == list(range(count))


def test_a_torn_last_record_is_dropped_on_resume(tmp_path):
    """kill -9 while a record is half written: the resumed run drops it with the steps it redoes."""
    log = MetricsLog(tmp_path, enabled=True)
    for step in range(4):
        log.write("train", step=step, loss=1.0)
    with log.path.open("a") as f:
        f.write('{"kind": "train", "step": 4, "lo')
    log.forget_after(2)
    log.write("train", step=3, loss=0.5)
    assert [(r["step"], r["loss"]) for r in read_records(log.path)] == [
        (0, 1.0),
        (1, 1.0),
        (2, 1.0),
        (3, 0.5),
    ]
