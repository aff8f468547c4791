"""The CIFAR source: the python batches read by a restricted unpickler, the DALI array
pipeline (pad-4 crop + flip), `data check`, and a few training steps of the recipe."""

import io
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from addertrain.config import DataConfig
from addertrain.data import cifar
from addertrain.data.dali import build_array_loader
from addertrain.errors import UserError
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 6


class Py2Pickler(pickle._Pickler):
    """Writes byte strings as Python 2's cPickle wrote str (the CIFAR files' format), not as
    Python 3's protocol-2 ``_codecs.encode`` call."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            head = pickle.SHORT_BINSTRING + bytes([n])
        else:
            head = pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump_py2(obj, path: Path) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # the files were written by numpy 1, whose _reconstruct lived in numpy.core.multiarray
    path.write_bytes(
        buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    )


def write_cifar10(root: Path, seed: int = 0) -> dict:
    """A tiny cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    made = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, PER_BATCH).tolist()
        dump_py2(
            {
                b"batch_label": name.encode(),
                b"labels": labels,
                b"data": data,
                b"filenames": [f"img_{i}.png".encode() for i in range(PER_BATCH)],
            },
            root / name,
        )
        made[name] = (data, labels)
    dump_py2(
        {
            b"num_cases_per_batch": PER_BATCH,
            b"label_names": [n.encode() for n in NAMES],
            b"num_vis": 3072,
        },
        root / "batches.meta",
    )
    return made


@pytest.fixture(scope="module")
def c10(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    return root, write_cifar10(root)


def test_batches_load_as_hwc_images_labels_and_names(c10):
    root, made = c10
    images, labels, classes = cifar.load(root, "train")
    assert classes == NAMES
    assert images.shape == (5 * PER_BATCH, 32, 32, 3) and images.dtype == np.uint8
    data, batch_labels = made["data_batch_2"]
    k = PER_BATCH + 3  # the 4th image of the second batch
    # a row holds the red plane, then green, then blue, each row-major
    pixel = 5 * 32 + 7
    assert np.array_equal(images[k, 5, 7], data[3, [pixel, 1024 + pixel, 2048 + pixel]])
    assert labels[k] == batch_labels[3]
    val_images, val_labels, _ = cifar.load(root, "val")
    assert len(val_images) == PER_BATCH and val_labels.tolist() == made["test_batch"][1]


def test_cifar100_layout_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name in ("train", "test"):
        dump_py2(
            {
                b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                b"fine_labels": [99, 0, 50, 7],
                b"coarse_labels": [19, 0, 10, 1],
            },
            root / name,
        )
    dump_py2(
        {
            b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"s{i}".encode() for i in range(20)],
        },
        root / "meta",
    )
    images, labels, classes = cifar.load(root, "train")
    assert len(classes) == 100 and labels.tolist() == [99, 0, 50, 7]


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    root = tmp_path / "c"
    write_cifar10(root)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload()}, protocol=4))
    with pytest.raises(UserError, match=r"data_batch_3 .*(posix|os)\.mkdir.*refused without run"):
        cifar.load(root, "train")
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", r"test_batch is not a CIFAR python batch \(pickle data was truncated"),
        ("shape", r"test_batch: 'data' must be a uint8 array of N x 3072"),
        ("labels", r"test_batch: labels must be integers in 0..9"),
    ],
)
def test_damaged_batches_are_named(tmp_path, damage, message):
    root = tmp_path / "c"
    write_cifar10(root)
    path = root / "test_batch"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "shape":
        dump_py2({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, path)
    else:
        dump_py2({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, path)
    with pytest.raises(UserError, match=message):
        cifar.load(root, "val")


def test_a_folder_without_cifar_files_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither batches.meta"):
        cifar.load(tmp_path, "train")
    write_cifar10(tmp_path / "c")
    (tmp_path / "c" / "data_batch_4").unlink()
    with pytest.raises(UserError, match="lacks data_batch_4"):
        cifar.load(tmp_path / "c", "train")


def raw_config(root, **kw) -> DataConfig:
    # mean 0, std 1/255: the pipeline's output is the pixel values themselves
    return DataConfig(
        source="cifar", root=str(root), mean=(0, 0, 0), std=(1 / 255,) * 3, threads=1, **kw
    )


def test_training_crops_are_zero_padded_shifts_and_flips(c10):
    root, _ = c10
    images, labels, _ = cifar.load(root, "train")
    loader = build_array_loader(
        raw_config(root, pad_crop=4), "train", 6, 0, 1, torch.device("cpu"), 0, True
    )
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    shifts, flips = set(), 0
    for x, y, valid in loader:
        assert x.shape == (6, 3, 32, 32) and valid == 6
        pixels = x.permute(0, 2, 3, 1).numpy().astype(np.uint8)
        for img, label in zip(pixels, y.tolist(), strict=True):
            found = [
                (i, dy, dx, m)
                for i in np.flatnonzero(labels == label)
                for dy in range(9)
                for dx in range(9)
                for m in (0, 1)
                if np.array_equal(img, padded[i, dy : dy + 32, dx : dx + 32][:, :: 1 - 2 * m])
            ]
            assert found, "a training image is not a padded shift (or its mirror) of a sample"
            shifts.add(found[0][1:3])
            flips += found[0][3]
    assert len(shifts) > 5 and 0 < flips < len(images)


def test_evaluation_images_are_the_samples_unchanged(c10):
    root, _ = c10
    images, labels, _ = cifar.load(root, "val")
    loader = build_array_loader(
        raw_config(root, pad_crop=4), "val", 4, 0, 1, torch.device("cpu"), 0, False
    )
    batches = list(loader)
    got = torch.cat([x for x, _, _ in batches])[: len(images)]
    assert torch.equal(got, torch.from_numpy(images).permute(0, 3, 1, 2).float())
    assert torch.cat([y for _, y, _ in batches])[: len(labels)].tolist() == labels.tolist()
    assert [v for _, _, v in batches] == [4, 2]


def test_two_shards_read_each_sample_once_and_resume_mid_epoch(c10):
    root, _ = c10
    d = raw_config(root, pad_crop=4)
    seen = []
    for shard in (0, 1):
        loader = build_array_loader(d, "train", 4, shard, 2, torch.device("cpu"), 3, True)
        it = iter(loader)
        first = next(it)
        state = loader.state_dict()
        rest = list(it)
        again = build_array_loader(d, "train", 4, shard, 2, torch.device("cpu"), 3, True)
        again.load_state_dict(json.loads(json.dumps(state)))
        resumed = list(again)
        assert len(resumed) == len(rest) == loader.steps_per_epoch - 1
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(rest, resumed, strict=True)
        )
        seen += [(x, y, v) for x, y, v in [first, *rest]]
    assert sum(v for _, _, v in seen) == 5 * PER_BATCH


def test_data_check_reports_a_cifar_folder_and_refuses_a_bad_one(c10, tmp_path):
    root, _ = c10
    out = cli("data", "check", str(root))
    assert out.returncode == 0, out.stderr
    assert f"train          10 classes        {5 * PER_BATCH} images of 32x32x3 uint8" in out.stdout
    bad = tmp_path / "bad"
    write_cifar10(bad)
    (bad / "data_batch_1").write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85R.")
    out = cli("data", "check", str(bad))
    assert out.returncode == 2
    assert (
        "data_batch_1 is not a CIFAR python batch (it names the Python object os.system"
        in out.stdout
    )


@pytest.mark.slow
def test_a_few_training_steps_of_the_recipe(c10, tmp_path):
    root, _ = c10
    out = cli(
        "launch",
        "recipes/cifar10_resnet20.yaml",
        f"data.root={root}",
        f"run.dir={tmp_path}",
        "distributed.executor=local",
        "distributed.workers=1",
        "distributed.gpus_per_worker=0",
        "train.global_batch=8",
        "train.micro_batch=8",
        "train.max_steps=3",
        "data.threads=1",
        "logging.interval_steps=1",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "cifar10-resnet20"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert json.loads((run / "classes.json").read_text()) == {n: i for i, n in enumerate(NAMES)}
    evaluation = json.loads((run / "result.json").read_text())["eval"]
    assert evaluation["samples"] == PER_BATCH
    # `eval --data` reads CIFAR batches wherever they are, as the recipe's source
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "cifar-10-batches-py")
    out = cli("eval", run / "final", "--data", moved, "--json", tmp_path / "eval.json")
    assert out.returncode == 0, out.stderr[-3000:]
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["data"] == str(moved) and again["samples"] == PER_BATCH
    assert again["top1"] == evaluation["top1"]
