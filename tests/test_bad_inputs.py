"""Bad datasets and run directories stop `addertrain launch` with one line and exit code 2."""

import errno
import os
import subprocess
from pathlib import Path

import pytest

from addertrain.data.fake import write_fake
from addertrain.storage import describe_write_error
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "recipes/synthetic_tiny.yaml",
    "data.image_size=8",
    "train.global_batch=4",
    "train.micro_batch=4",
    "train.max_steps=2",
    "train.eval_interval=0",
    "logging.progress=false",
    "distributed.executor=local",
    "distributed.workers=1",
]


def launch(*args):
    return cli("launch", *TINY, *args)


def assert_user_error(out, *phrases):
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    # DALI's decoder logs its own line before ours; ours is the last and the only one of ours
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("addertrain: error: ") and out.stderr.count("addertrain: error:") == 1
    for phrase in phrases:
        assert phrase in last, (phrase, last)


@pytest.fixture
def dataset(tmp_path):
    return write_fake(tmp_path / "ds", classes=2, per_class=4, val_per_class=1, sizes=(16, 24))


def folder(root):
    return ["data.source=folder", f"data.root={root}", "model.num_classes=2"]


def test_launch_opens_every_file_before_the_workers_start(dataset, tmp_path):
    c000 = dataset / "train" / "c000"
    (c000 / "empty.JPEG").write_bytes(b"")
    (dataset / "val" / "c001" / "page.jpg").write_text("<html>")
    (c000 / "x.JPEG").mkdir()
    (c000 / "gone.JPEG").symlink_to(c000 / "nowhere.JPEG")
    (c000 / "loop.JPEG").symlink_to(c000 / "loop.JPEG")
    out = launch(*folder(dataset), f"run.dir={tmp_path / 'runs'}")
    assert_user_error(
        out,
        f"dataset {dataset} cannot be trained on",
        "train/c000/gone.JPEG (missing or a broken symlink)",
        "train/c000/loop.JPEG (symlink loop)",
        "train/c000/x.JPEG (a folder named like an image)",
        "train/c000/empty.JPEG (empty file)",
        "val/c001/page.jpg (not an image: starts with 3c 68 74 6d 6c 3e)",
        f"Run `addertrain data check {dataset}`",
    )


def test_an_image_that_fails_to_decode_mid_run_is_named(dataset, tmp_path):
    victim = sorted((dataset / "train" / "c001").iterdir())[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # its first bytes still say JPEG: launch passes it
    out = launch(*folder(dataset), f"run.dir={tmp_path / 'runs'}")
    assert_user_error(
        out, f"the image decoder failed on {victim} (", f"`addertrain data check {dataset}`"
    )


@pytest.mark.parametrize("source", ["folder", "synthetic"])
def test_less_data_than_one_step_is_refused(source, dataset, tmp_path):
    data = folder(dataset) if source == "folder" else ["data.synthetic.train_size=12"]
    out = launch(*data, "train.global_batch=16", f"run.dir={tmp_path / 'runs'}")
    images = 8 if source == "folder" else 12
    assert_user_error(
        out,
        f"the training data has {images} images, less than one optimizer step "
        f"of train.global_batch=16; lower train.global_batch to {images} or less",
    )


# -- the run directory ---------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder; skips where mounting needs privileges we lack."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
        )
        if r.returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        # lazily: a failed torch.save may still hold its file open until garbage collection
        subprocess.run(["umount", "--lazy", str(point)], check=True)


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    out = launch(f"run.dir={tmp_path / 'afile'}")
    assert_user_error(out, str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == ""


def test_run_dir_on_a_read_only_file_system(tmpfs):
    out = launch(f"run.dir={tmpfs('ro,size=1m') / 'runs'}")
    assert_user_error(out)
    assert "read-only file system" in out.stderr.lower()


def test_run_dir_on_a_full_disk(tmpfs):
    disk = tmpfs("size=1m")
    with open(disk / "filler", "wb") as f:  # leave two pages: the run lock fits, a checkpoint not
        f.write(b"\0" * (2**20 - 8192))
    out = launch(f"run.dir={disk / 'runs'}")
    assert_user_error(
        out,
        f"no space left for {disk / 'runs' / 'synthetic-tiny'}",
        "free space or set run.dir to a larger disk",
    )


def test_checkpoint_on_a_disk_that_fills_up(tmpfs):
    # room for the pre-flight and the logs, not for a checkpoint (about 2 MB for ResNet-20)
    disk = tmpfs("size=1m")
    out = launch(f"run.dir={disk / 'runs'}", "train.max_steps=2", "train.eval_interval=0")
    assert_user_error(out, "free space or set run.dir to a larger disk, then resume")
    assert not list((disk / "runs" / "synthetic-tiny" / "checkpoints").glob("tmp-*"))


def test_torch_short_write_is_reported_as_a_full_disk(tmpfs):
    import torch

    disk = tmpfs("size=64k")
    with pytest.raises(RuntimeError) as err:
        torch.save({"w": torch.zeros(100_000)}, disk / "ckpt.pt")
    assert "unexpected pos" in str(err.value)  # what torch says, and what used to reach the user
    message = describe_write_error(err.value, disk / "ckpt.pt")
    assert message.startswith(
        f"writing {disk / 'ckpt.pt'} failed part-way, most likely because its disk is full ("
    )


def test_write_errors_in_words(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError) as err:
        (tmp_path / "f" / "run").mkdir(parents=True)
    assert describe_write_error(err.value, tmp_path / "f" / "run") == (
        f"{tmp_path / 'f'} is a file, not a folder; set run.dir to a folder (or remove the file)"
    )
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES))  # root ignores permissions
    assert describe_write_error(denied, tmp_path).startswith(f"no permission to write {tmp_path}")
    assert describe_write_error(ValueError("x"), tmp_path) is None
