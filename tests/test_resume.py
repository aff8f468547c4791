"""Checkpoints and resume through the CLI, for real: a killed, crashed or preempted run continues
to the same weights and losses as an uninterrupted one (fp32, CPU, deterministic)."""

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from addertrain import checkpoint
from addertrain.errors import UserError
from addertrain.metrics import read_records
from addertrain.model_io import checkpoint_model
from conftest import cli, cli_command, preempt_while_paused

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/synthetic_tiny.yaml"
# 16 steps of 16 images (8 per epoch, evaluations at 8 and 16), checkpoints every 5 steps.
TINY = [
    "data.image_size=8",
    "data.synthetic.train_size=128",
    "data.synthetic.val_size=32",
    "train.global_batch=16",
    "train.micro_batch=8",
    "run.deterministic=true",
    "checkpoint.interval_steps=5",
    "logging.interval_steps=1",
    "logging.progress=false",
]
KILL_AFTER = 12  # between the checkpoints of steps 10 and 15


def launch(*args, env=None, timeout=300):
    return cli("launch", *args, env=env, timeout=timeout)


def start(*args):
    return subprocess.Popen(
        cli_command("launch", *args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in read_records(path) if r["kind"] == "train"]


def losses(run_dir: Path) -> dict[int, float]:
    records = read_records(run_dir / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def wait_for_step(proc, run_dir: Path, step: int, timeout=240):
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in train_steps(run_dir)):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


def assert_same_weights(run_dir: Path, ref_dir: Path):
    ours, theirs = (load_file(d / "final" / "model.safetensors") for d in (run_dir, ref_dir))
    assert ours.keys() == theirs.keys()
    differ = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ[:5]}"


def evaluations(run_dir: Path) -> dict[int, tuple[float, float]]:
    records = read_records(run_dir / "metrics.jsonl")
    return {r["step"]: (r["top1"], r["loss"]) for r in records if r["kind"] == "eval"}


def assert_same_run(run_dir: Path, ref_dir: Path):
    """Final weights and BatchNorm statistics bitwise equal, and one logged loss per step and
    every evaluation, each equal to the reference's."""
    assert_same_weights(run_dir, ref_dir)
    steps = train_steps(ref_dir)
    assert steps == list(range(1, len(steps) + 1)) and train_steps(run_dir) == steps
    assert losses(run_dir) == losses(ref_dir)
    assert evaluations(run_dir) == evaluations(ref_dir)


def resumed_step(out: str) -> int:
    line = next(line for line in out.splitlines() if line.startswith("resumed from"))
    return int(line.split("at step ")[1].split("/")[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(runs):
    out = launch(RECIPE, *TINY, f"run.dir={runs}", "run.name=reference")
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "reference"


def test_checkpoints_are_kept_by_recency_and_validation(reference):
    folder = reference / "checkpoints"
    # saved at 5, 8 (evaluation), 10, 15, 16 (end); kept: the last 2 and the best evaluated
    metas = {p.name: json.loads((p / "meta.json").read_text()) for p in folder.glob("step*")}
    assert (folder / "latest").read_text() == "step00000016"
    assert set(metas) >= {"step00000015", "step00000016"} and len(metas) <= 3
    best = max((m for m in metas.values() if m["top1"] is not None), key=lambda m: m["top1"])
    evals = {
        r["step"]: r["top1"]
        for r in read_records(reference / "metrics.jsonl")
        if r["kind"] == "eval"
    }
    assert best["top1"] == max(evals.values())
    assert not list(folder.glob("tmp-*"))
    result = json.loads((reference / "result.json").read_text())
    assert result["status"] == "completed" and result["checkpoint_seconds"] > 0


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_run(runs, reference):
    run_dir = runs / "killed"
    args = (RECIPE, *TINY, f"run.dir={runs}", "run.name=killed")
    proc = start(*args)
    wait_for_step(proc, run_dir, KILL_AFTER)
    proc.kill()
    proc.wait()
    assert not (run_dir / "result.json").exists()
    out = launch(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 5 <= resumed_step(out.stdout) < 16 and resumed_step(out.stdout) % 5 == 0
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_signal_checkpoints_exits_75_and_resumes(runs, reference):
    run_dir = runs / "signalled"
    args = (RECIPE, *TINY, f"run.dir={runs}", "run.name=signalled")
    proc = start(*args)
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, stdout[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "preempted" and result["steps"] < 16
    assert (run_dir / "checkpoints" / "latest").read_text() == checkpoint.tag_for(result["steps"])
    assert not (run_dir / "final").exists()
    out = launch(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert resumed_step(out.stdout) == result["steps"]
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_crash_while_saving_leaves_the_previous_checkpoint(runs, reference):
    run_dir = runs / "crashed"
    args = (RECIPE, *TINY, f"run.dir={runs}", "run.name=crashed")
    out = launch(*args, env={checkpoint.CRASH_BEFORE_PUBLISH: "10"})
    assert out.returncode == -signal.SIGKILL
    folder = run_dir / "checkpoints"
    assert (folder / "tmp-step00000010" / "meta.json").is_file()  # written, never published
    assert (folder / "latest").read_text() == "step00000008"
    out = launch(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "removing the unfinished checkpoint" in out.stdout and resumed_step(out.stdout) == 8
    assert not list(folder.glob("tmp-*"))
    assert_same_run(run_dir, reference)


def test_export_and_eval_of_a_checkpoint(reference, tmp_path):
    out = subprocess.run(
        cli_command("export", str(reference), str(tmp_path / "export")),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the last checkpoint holds the final model
    exported = load_file(tmp_path / "export" / "model.safetensors")
    final = load_file(reference / "final" / "model.safetensors")
    assert exported.keys() == final.keys() and all(
        torch.equal(exported[k], final[k]) for k in final
    )
    top1 = json.loads((reference / "result.json").read_text())["eval"]["top1"]
    for path in (tmp_path / "export", reference / "checkpoints" / "step00000016"):
        out = subprocess.run(
            cli_command(
                "eval", str(path), "--data", "synthetic", "--json", str(tmp_path / "eval.json")
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "top-1" in out.stdout
        assert json.loads((tmp_path / "eval.json").read_text())["top1"] == top1


# -- bad checkpoints: one clear message each, exit 2, no traceback ---------------------------------


def assert_user_error(out, *phrases):
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    for phrase in phrases:
        assert phrase in out.stderr, out.stderr


@pytest.fixture
def copied(reference, tmp_path):
    """A copy of the reference checkpoint at step 16 and an args builder for a new run."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference / "checkpoints" / "step00000016", ckpt)
    return ckpt, (RECIPE, *TINY, f"run.dir={tmp_path / 'runs'}")


def test_missing_checkpoint_is_an_error(copied, tmp_path):
    _, args = copied
    assert_user_error(launch(*args, "--resume", str(tmp_path / "nowhere")), "does not exist")


def test_foreign_directory_is_an_error(copied, tmp_path):
    _, args = copied
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "weights.bin").write_bytes(b"x" * 10)
    assert_user_error(
        launch(*args, "--resume", str(tmp_path / "foreign")), "is not an addertrain checkpoint"
    )


def test_truncated_checkpoint_is_an_error(copied):
    ckpt, args = copied
    model = ckpt / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])
    assert_user_error(launch(*args, "--resume", str(ckpt)), "truncated")
    # the same size, damaged content: caught by the weights-only read
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][model.name] = 1000
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert_user_error(launch(*args, "--resume", str(ckpt)), "cannot be read as tensors")


def test_changed_recipe_is_an_error_unless_allowed(copied, tmp_path):
    ckpt, args = copied
    assert_user_error(
        launch(*args, "model.arch=resnet32", "optim.lr=0.2", "--resume", str(ckpt)),
        "model.arch ('resnet20' -> 'resnet32')",
        "optim.lr (0.1 -> 0.2)",
        "--allow-change",
    )
    # a deliberate change: two more epochs from the finished run's checkpoint
    out = launch(
        *args, "schedule.epochs=3", "--allow-change", "schedule.epochs", "--resume", str(ckpt)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert resumed_step(out.stdout) == 16
    assert train_steps(tmp_path / "runs" / "synthetic-tiny") == list(range(17, 25))


def test_sharded_state_across_world_sizes_is_refused(copied):
    ckpt, _ = copied
    meta = checkpoint.read_meta(ckpt)
    recipe = {**meta["recipe"], "distributed": {**meta["recipe"]["distributed"], "zero_stage": 1}}
    with pytest.raises(UserError, match="ZeRO stage 1 .* resume with distributed.workers=1"):
        checkpoint.check_world(meta, ckpt, 2, recipe)
    checkpoint.check_world(meta, ckpt, 2, meta["recipe"])  # ZeRO 0: the step places the data


# -- the folder/DALI loader: the mid-epoch reader position ---------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from addertrain.data.digits import prepare_digits

    return prepare_digits(tmp_path_factory.mktemp("data") / "digits", 8)


@pytest.mark.slow
def test_kill_9_mid_epoch_with_the_dali_loader(runs, digits):
    # digits: 1437 training images in batches of 64 -> 23 steps per epoch (the last topped up),
    # 2 micro-batches each; killed mid-epoch 1
    folder = [
        "recipes/digits.yaml",
        f"data.root={digits}",
        "data.image_size=8",
        "model.arch=resnet20",
        "distributed.executor=local",
        "distributed.workers=1",
        "train.global_batch=64",
        "train.micro_batch=32",
        "train.max_steps=30",
        "train.eval_interval=0",
        "checkpoint.interval_steps=25",
        "logging.interval_steps=1",
        "logging.progress=false",
        "run.deterministic=true",
        f"run.dir={runs}",
    ]
    ref = launch(*folder, "run.name=dali-ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = start(*folder, "run.name=dali-killed")
    wait_for_step(proc, runs / "dali-killed", 27)
    proc.kill()
    proc.wait()
    out = launch(*folder, "run.name=dali-killed")
    assert out.returncode == 0, out.stderr[-3000:]
    assert resumed_step(out.stdout) == 25  # mid-epoch: step 2 of epoch 1
    state = json.loads(
        (runs / "dali-ref" / "checkpoints" / "step00000025" / "rank0.json").read_text()
    )
    assert state["train_data"]["step"] == 2 * 2 and "dali" in state["train_data"]
    ours, theirs = losses(runs / "dali-killed"), losses(runs / "dali-ref")
    assert ours == theirs and sorted(ours) == list(range(1, 31))
    assert_same_weights(runs / "dali-killed", runs / "dali-ref")


# -- Ray: a worker dies, Ray restarts the group from the checkpoint ------------------------------


def ray_workers(pid: int) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline())
    ]


RAY = (
    RECIPE,
    *TINY,
    "distributed.executor=ray",
    "distributed.workers=2",
    "distributed.max_failures=1",
    "checkpoint.keep_last=5",
)


@pytest.fixture(scope="module")
def ray_reference(runs):
    ref = launch(*RAY, f"run.dir={runs}", "run.name=ray-ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    return runs / "ray-ref"


@pytest.mark.slow
def test_ray_restarts_a_killed_worker_from_the_checkpoint(runs, ray_reference):
    proc = start(*RAY, f"run.dir={runs}", "run.name=ray-killed")
    wait_for_step(proc, runs / "ray-killed", KILL_AFTER)
    workers = ray_workers(proc.pid)
    assert len(workers) == 2, [p.cmdline() for p in workers]
    workers[1].kill()
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:]
    assert "resumed from" in stdout
    assert_same_run(runs / "ray-killed", ray_reference)


@pytest.mark.slow
def test_two_worker_run_reports_the_evaluation_of_the_model_it_saved(ray_reference):
    from test_training import assert_reported_equals_export

    assert_reported_equals_export(ray_reference)


@pytest.mark.slow
def test_resume_on_one_worker_from_a_two_worker_checkpoint(runs, ray_reference):
    # the same global batch on one worker (local executor), from the 2-worker checkpoint at 10
    ckpt = ray_reference / "checkpoints"
    shutil.copytree(ckpt / "step00000010", runs / "from-2-workers-ckpt")
    out = launch(
        RECIPE,
        *TINY,
        f"run.dir={runs}",
        "run.name=one-worker",
        "--resume",
        str(runs / "from-2-workers-ckpt"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert resumed_step(out.stdout) == 10
    ours, theirs = losses(runs / "one-worker"), losses(ray_reference)
    assert sorted(ours) == list(range(11, 17))
    # the same batches from step 11 on; only the summation order of the gradient differs
    for step in range(11, 17):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-3), step


def preempt_and_resume(runs: Path, name: str, *extra: str) -> Path:
    """A 2-worker Ray run sent SIGTERM at step 3 (exit 75), then launched again to the end."""
    args = (*RAY, f"run.dir={runs}", f"run.name={name}", *extra)
    proc = start(*args)
    wait_for_step(proc, runs / name, 3)
    # The driver's handler runs between Ray's polls, up to a second later on a loaded machine:
    # the workers wait for it.
    workers = [p.pid for p in ray_workers(proc.pid)]
    assert len(workers) == 2
    preempt_while_paused(lambda: proc.send_signal(signal.SIGTERM), workers, runs / name)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, stdout[-3000:]
    out = launch(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / name


@pytest.mark.slow
def test_sigterm_under_ray_checkpoints_and_exits_75(runs, ray_reference):
    # ray.init installs its own fatal-signal handler for SIGTERM: ours must win
    assert_same_run(preempt_and_resume(runs, "ray-signalled"), ray_reference)


@pytest.mark.slow
def test_bn_reestimation_changes_only_what_is_evaluated_and_exported(runs, ray_reference):
    from test_training import assert_reported_equals_export

    run_dir = preempt_and_resume(runs, "ray-reestimated", "eval.bn_recalibration_batches=2")
    # Training and its checkpoints are untouched, through a resume.
    assert losses(run_dir) == losses(ray_reference)
    ours, ref = (checkpoint_model(d / "checkpoints")[0] for d in (run_dir, ray_reference))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    # Evaluations (and the export) use statistics of their own.
    evals = [r for r in read_records(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["bn_recalibration_batches"] for r in evals] == [2, 2]
    assert evaluations(run_dir).keys() == evaluations(ray_reference).keys()
    assert evaluations(run_dir) != evaluations(ray_reference)
    ours, ref = (load_file(d / "final" / "model.safetensors") for d in (run_dir, ray_reference))
    stats = [k for k in ref if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(ours[k], ref[k]) for k in stats)
    assert all(torch.equal(ours[k], ref[k]) for k in ref if k not in stats)
    assert_reported_equals_export(run_dir)
