"""No code runs from a checkpoint: crafted pickles whose payload would create a file are refused
(exit 2, one line) on every path that loads a checkpoint; retention deletes only its own folders."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from addertrain import checkpoint
from addertrain.errors import UserError
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/synthetic_tiny.yaml"
TINY = [
    "data.image_size=8",
    "data.synthetic.train_size=32",
    "data.synthetic.val_size=16",
    "train.global_batch=16",
    "train.micro_batch=16",
    "train.max_steps=2",
    "logging.progress=false",
    "logging.plots=false",
]
MODEL = "mp_rank_00_model_states.pt"


class Payload:
    """Unpickled without restriction, this creates ``target``."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


def assert_refused(out, *phrases):
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("addertrain: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def craft(path: Path, payload: Path) -> None:
    torch.save({"module": Payload(payload)}, path)


def list_sizes(ckpt: Path) -> None:
    """Record the current sizes in meta.json, as if the files had been written with it."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {name: (ckpt / name).stat().st_size for name in meta["files"]}
    (ckpt / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real checkpoint of a two-step local run."""
    runs = tmp_path_factory.mktemp("runs")
    out = cli("launch", RECIPE, *TINY, f"run.dir={runs}", "run.name=real")
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "real" / "checkpoints" / checkpoint.tag_for(2)


@pytest.fixture
def copy(real, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(real, ckpt)
    return ckpt


@pytest.fixture
def payload(tmp_path):
    target = tmp_path / "payload-ran"
    yield target
    assert not target.exists(), "the crafted pickle ran"


def launch_args(tmp_path):
    return (RECIPE, *TINY, f"run.dir={tmp_path / 'runs'}", "run.name=victim")


# -- launch: the recipe key and an unlisted file ------------------------------------------------


def test_recipe_resume_key_is_verified(copy, payload, tmp_path):
    # a checkpoint whose listed model file is a crafted pickle with the recorded size, named by the
    # recipe key: with `--resume auto` and no checkpoint of the run's own, launch checks it as it
    # checks `--resume PATH` (and the worker checks it again before DeepSpeed loads it)
    craft(copy / MODEL, payload)
    list_sizes(copy)
    out = cli("launch", *launch_args(tmp_path), f"checkpoint.resume={copy}")
    assert_refused(out, str(copy / MODEL), "cannot be read as tensors")


def test_unlisted_pt_file_is_refused_by_launch(copy, payload, tmp_path):
    # DeepSpeed globs mp_rank_*_model_states.pt; this name sorts first and would be unpickled
    craft(copy / "mp_rank_-1_model_states.pt", payload)
    out = cli("launch", *launch_args(tmp_path), "--resume", str(copy))
    assert_refused(out, "does not list", "mp_rank_-1_model_states.pt")


def test_unlisted_file_of_any_kind_is_refused(copy):
    (copy / "zero").mkdir()
    (copy / "zero" / "notes.txt").write_text("x")
    with pytest.raises(
        UserError,
        match=r"1 file\(s\) that its meta.json does not list "
        r"\(zero/notes.txt\)",
    ):
        checkpoint.read_meta(copy)
    (copy / "zero" / "notes.txt").unlink()
    checkpoint.read_meta(copy)  # an empty folder holds nothing to load


def test_listed_name_outside_the_checkpoint_is_refused(copy, tmp_path):
    (tmp_path / "elsewhere.pt").write_bytes(b"x")
    meta = json.loads((copy / "meta.json").read_text())
    meta["files"]["../elsewhere.pt"] = 1
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="is missing"):
        checkpoint.read_meta(copy)


def test_workers_load_nothing_but_tensors(tmp_path, payload):
    # DeepSpeed's own torch.load(weights_only=False), after worker_env: a file swapped in after
    # the verification still cannot run code
    craft(tmp_path / "swapped.pt", payload)
    code = (
        "import torch; from addertrain.worker import worker_env; worker_env(); "
        f"torch.load({str(tmp_path / 'swapped.pt')!r}, weights_only=False)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
    )
    assert out.returncode != 0 and "UnpicklingError" in out.stderr, out.stderr[-2000:]


# -- eval and export ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "export"])
def test_eval_and_export_refuse_an_unlisted_file(command, copy, payload, tmp_path):
    craft(copy / "mp_rank_-1_model_states.pt", payload)
    extra = ["--data", "synthetic"] if command == "eval" else [str(tmp_path / "out")]
    assert_refused(cli(command, str(copy), *extra), "does not list")


@pytest.mark.parametrize("command", ["eval", "export"])
def test_eval_and_export_refuse_a_crafted_model_file(command, copy, payload, tmp_path):
    craft(copy / MODEL, payload)
    list_sizes(copy)
    extra = ["--data", "synthetic"] if command == "eval" else [str(tmp_path / "out")]
    assert_refused(
        cli(command, str(copy), *extra), "cannot be read as tensors", "Unsupported global"
    )


def test_eval_of_a_pickle_without_a_model_is_an_error(copy):
    torch.save([1, 2, 3], copy / MODEL)
    list_sizes(copy)
    assert_refused(cli("eval", str(copy), "--data", "synthetic"), "holds no model weights")


# -- what DeepSpeed legitimately pickles ---------------------------------------------------------


@pytest.mark.slow
def test_zero_1_checkpoint_verifies_and_resumes(tmp_path):
    # ZeRO optimizer states hold DeepSpeed's loss scaler, ZeRO stage and fragment addresses: plain
    # data the weights-only reads must accept (the verification and the workers' forced load)
    args = (*launch_args(tmp_path), "distributed.zero_stage=1", "train.max_steps=1")
    first = cli("launch", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    more = cli("launch", *args, "train.max_steps=2", "--allow-change", "train.max_steps")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from" in more.stdout and "at step 1/2" in more.stdout


# -- a resume that changes the model's shapes ---------------------------------------------------


def test_allow_change_to_another_architecture_is_an_error(real, tmp_path):
    out = cli(
        "launch",
        *launch_args(tmp_path),
        "model.arch=resnet32",
        "--allow-change",
        "model",
        "--resume",
        str(real),
    )
    assert_refused(out, "does not fit this recipe's model", "model.arch")


# -- retention ----------------------------------------------------------------------------------


def fake_checkpoint(folder: Path, name: str, step: int, top1=None, tag=None) -> Path:
    path = folder / name
    path.mkdir(parents=True)
    (path / "meta.json").write_text(
        json.dumps({"step": step, "top1": top1, "tag": tag or checkpoint.tag_for(step)})
    )
    return path


def test_retention_ignores_tags_stored_on_disk(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    victim = tmp_path / "victim"
    victim.mkdir()
    old = fake_checkpoint(folder, checkpoint.tag_for(1), 1, tag="../../victim")
    current = fake_checkpoint(folder, checkpoint.tag_for(2), 2)
    assert checkpoint.retain(folder, 1, 0, current) == [old]
    assert victim.is_dir() and current.is_dir() and not old.exists()


def test_retention_leaves_copies_and_foreign_folders_alone(tmp_path):
    folder = tmp_path / "checkpoints"
    ten = fake_checkpoint(folder, checkpoint.tag_for(10), 10, top1=50.0)
    shutil.copytree(ten, folder / "backup")  # cp -r step00000010 backup
    fake_checkpoint(folder, checkpoint.tag_for(99), 12)  # its step is not its name
    fake_checkpoint(folder, "tmp-" + checkpoint.tag_for(14), 14)
    (folder / checkpoint.tag_for(13)).symlink_to(ten)
    current = fake_checkpoint(folder, checkpoint.tag_for(20), 20)
    assert checkpoint.retain(folder, 1, 0, current) == [ten]
    assert sorted(p.name for p in folder.iterdir()) == [
        "backup",
        checkpoint.tag_for(13),
        checkpoint.tag_for(20),
        checkpoint.tag_for(99),
        "tmp-" + checkpoint.tag_for(14),
    ]
    assert json.loads((folder / "backup" / "meta.json").read_text())["step"] == 10


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    folder = tmp_path / "checkpoints"
    made = [
        fake_checkpoint(folder, checkpoint.tag_for(s), s, top1=t)
        for s, t in ((5, None), (8, 70.0), (10, None), (15, None), (16, 60.0))
    ]
    assert checkpoint.retain(folder, 2, 1, made[-1]) == [made[0], made[2]]


def test_recipe_resume_key_under_ray_runs_no_code(copy, payload, tmp_path):
    # launch checks the recipe key as it checks --resume PATH, and the Ray worker again
    craft(copy / MODEL, payload)
    list_sizes(copy)
    out = cli(
        "launch", *launch_args(tmp_path), "distributed.executor=ray", f"checkpoint.resume={copy}"
    )
    assert out.returncode != 0, out.stdout[-2000:]
    assert "cannot be read as tensors" in out.stdout + out.stderr
