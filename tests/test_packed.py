"""``data.source: packed``: the DALI pipeline over packed shards against the folder reader of
the same images, resume, file opens, and the launch check of the shards."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml

from addertrain.bench.data import count_epoch_opens
from addertrain.data.dali import build_folder_loader, build_packed_loader
from addertrain.data.fake import write_fake
from addertrain.data.pack import pack_folder
from addertrain.data.shards import sample_table
from addertrain.errors import UserError
from addertrain.metrics import read_records
from conftest import cli
from test_data_pipeline import cfg, ident, image_ids  # noqa: F401 - ident is a fixture

CPU = torch.device("cpu")
SHARD_BYTES = 4096  # a few JPEGs of 20-40 px per shard: every test set has several shards


def packed_cfg(root, **kw):
    return cfg(root).model_copy(update={"source": "packed", **kw})


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """A folder of noisy JPEGs (every crop and flip shows) and its packed copy."""
    top = tmp_path_factory.mktemp("textured")
    folder = write_fake(top / "folder", classes=3, per_class=7, val_per_class=3, sizes=(20, 40))
    pack_folder(folder, top / "packed", SHARD_BYTES)
    return folder, top / "packed"


@pytest.fixture(scope="module")
def ident_packed(ident, tmp_path_factory):  # noqa: F811 - the imported fixture
    dst = tmp_path_factory.mktemp("ident") / "packed"
    pack_folder(ident, dst, SHARD_BYTES)
    return dst


def loaders(folder, packed, split, shard, shards, seed, **kw):
    training = split == "train"
    return (
        build_folder_loader(cfg(folder, **kw), split, 4, shard, shards, CPU, seed, training),
        build_packed_loader(packed_cfg(packed, **kw), split, 4, shard, shards, CPU, seed, training),
    )


def batches(loader) -> list:
    return [(x.clone(), y.clone(), v) for x, y, v in loader]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (x, y, v), (x2, y2, v2) in zip(a, b):
        assert torch.equal(y, y2) and v == v2
        assert torch.equal(x, x2)


@pytest.mark.parametrize("rrc", [True, False])
def test_packed_training_batches_equal_the_folder_readers(textured, rrc):
    """Same seed: the same samples in the same order, labels, and augmented pixels, bitwise
    (the JPEG bytes are the originals and the random operators have the same seeds)."""
    for shard in range(2):
        folder, packed = loaders(*textured, "train", shard, 2, 7, random_resized_crop=rrc)
        assert folder.fingerprint["samples"] == packed.fingerprint["samples"] == 21
        for epoch in range(3):
            assert packed.epoch == folder.epoch == epoch
            assert_same(batches(folder), batches(packed))


def test_packed_evaluation_equals_the_folder_readers(textured):
    folder, packed = loaders(*textured, "val", 1, 2, 0)
    assert_same(batches(folder), batches(packed))


def test_packed_labels_follow_the_sorted_classes(ident_packed):
    loader = build_packed_loader(packed_cfg(ident_packed), "train", 5, 0, 1, CPU, 0, True)
    ids = [i for batch in loader for i in image_ids(*batch, 0)]  # checks each label
    assert sorted(ids) == list(range(23))


def test_restored_packed_loader_yields_the_same_next_batches(textured):
    def loader():
        return build_packed_loader(packed_cfg(textured[1]), "train", 4, 1, 2, CPU, 11, True)

    original = loader()
    original.set_epoch(2)
    it = iter(original)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(original.state_dict()))
    expected = [(x.clone(), y.clone(), v) for x, y, v in it]  # rest of epoch 2
    expected += batches(original)[:2]  # start of epoch 3
    restored = loader()
    restored.load_state_dict(state)
    restored.set_epoch(2)
    assert restored.state_dict() == state
    assert_same(expected, list(restored) + batches(restored)[:2])


def test_a_packed_resume_on_another_number_of_workers_continues_at_the_same_samples(
    ident_packed,
):
    def loader(shard, shards, group):
        d = packed_cfg(ident_packed)
        return build_packed_loader(d, "train", 4, shard, shards, CPU, 3, True, group)

    two = [iter(loader(s, 2, 1)) for s in range(2)]
    step_1 = [i for it in two for i in image_ids(*next(it), 0)]
    after_1 = sorted(i for it in two for batch in it for i in image_ids(*batch, 0))
    one = loader(0, 1, 2)
    one.seek(0, 2)
    it = iter(one)
    ids = image_ids(*next(it), 0)
    state = json.loads(json.dumps(one.state_dict()))
    restored = loader(0, 1, 2)
    restored.load_state_dict(state)
    rest = [i for batch in it for i in image_ids(*batch, 0)]
    assert [i for batch in restored for i in image_ids(*batch, 0)] == rest
    assert sorted(ids + rest) == after_1
    assert sorted(step_1 + after_1) == list(range(23))


def test_a_changed_packed_dataset_is_refused_on_resume(textured, tmp_path):
    other = tmp_path / "packed"
    pack_folder(textured[0], other, SHARD_BYTES * 2)  # same images, other shards
    one = build_packed_loader(packed_cfg(textured[1]), "train", 4, 0, 1, CPU, 0, True)
    next(iter(one))
    two = build_packed_loader(packed_cfg(other), "train", 4, 0, 1, CPU, 0, True)
    with pytest.raises(UserError, match="dataset"):
        two.load_state_dict(one.state_dict())


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")
def test_an_epoch_opens_each_shard_it_reads_once_and_no_image(textured):
    """Counted by strace around one epoch of a fresh loader, in a child process."""
    folder, packed = textured
    opens = count_epoch_opens(
        {"root": str(folder), "packed": str(packed), "split": "train", "size": 16, "batch": 4}
        | {"threads": 2}
    )
    shards = len(json.loads((packed / "manifest.json").read_text())["splits"]["train"]["shards"])
    assert shards > 2
    assert 0 < opens["packed"]["shards_read"] <= shards
    assert opens["packed"]["opens_per_epoch"] <= opens["packed"]["shards_read"]
    assert opens["folder"]["opens_per_epoch"] >= 21  # the count sees the folder's per-image opens


def test_a_sample_the_decoder_fails_on_is_named_by_shard_and_key(tmp_path):
    folder = write_fake(tmp_path / "f", classes=2, per_class=4, val_per_class=1, sizes=(24, 24))
    packed = tmp_path / "packed"
    pack_folder(folder, packed, SHARD_BYTES)
    table = sample_table(packed, "train")
    row = 5
    shard = json.loads((packed / "manifest.json").read_text())["splits"]["train"]["shards"][
        int(table[row]["shard"])
    ]["name"]
    key = (packed / "train.keys.txt").read_text().splitlines()[row]
    with open(packed / shard, "r+b") as f:  # past the header: the scan data, at its size
        f.seek(int(table[row]["offset"]) + 200)
        f.write(b"\xff\xd9" + bytes(int(table[row]["size"]) - 202))
    loader = build_packed_loader(packed_cfg(packed), "train", 2, 0, 1, CPU, 0, True)
    with pytest.raises(
        UserError,
        match=rf"the image decoder failed on {re.escape(str(packed / shard))} member "
        rf"{re.escape(key)}\.jpg \(.*\); repack",
    ):
        for _ in loader:
            pass


# -- launch ------------------------------------------------------------------------------


def tiny_packed(packed, run_dir, *extra) -> list[str]:
    return [
        "recipes/synthetic_tiny.yaml",
        "data.source=packed",
        f"data.root={packed}",
        "model.num_classes=3",
        f"run.dir={run_dir}",
        "train.global_batch=8",
        "train.micro_batch=4",
        "data.threads=1",
        *extra,
    ]


def copy_of(packed, tmp_path):
    return shutil.copytree(packed, tmp_path / "packed")


@pytest.mark.parametrize("damage", ["missing", "size", "newer"])
def test_launch_refuses_damaged_packed_data(textured, tmp_path, damage):
    packed = copy_of(textured[1], tmp_path)
    manifest = json.loads((packed / "manifest.json").read_text())
    shard = packed / manifest["splits"]["train"]["shards"][1]["name"]
    if damage == "missing":
        shard.unlink()
    elif damage == "size":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 512)
    else:
        manifest["format"] += 1
        (packed / "manifest.json").write_text(json.dumps(manifest))
    out = cli("launch", *tiny_packed(packed, tmp_path / "runs"), timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    named = "manifest.json" if damage == "newer" else shard.name
    assert named in out.stderr
    assert not (tmp_path / "runs" / "synthetic-tiny" / "metrics.jsonl").exists()


def test_launch_refuses_a_class_count_other_than_the_models(textured, tmp_path):
    out = cli("launch", *tiny_packed(textured[1], tmp_path, "model.num_classes=4"), timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "3 classes but model.num_classes is 4" in out.stderr


@pytest.mark.slow
def test_packed_training_through_ray_with_two_workers(textured, tmp_path):
    out = cli(
        "launch",
        *tiny_packed(
            textured[1],
            tmp_path,
            "distributed.executor=ray",
            "distributed.workers=2",
            "train.max_steps=4",
            "train.eval_interval=0",
            "logging.interval_steps=1",
            "logging.progress=false",
        ),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "synthetic-tiny"
    train = [r for r in read_records(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in train)
    assert json.loads((run / "classes.json").read_text()) == {"c000": 0, "c001": 1, "c002": 2}
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["eval"]["samples"] == 9  # every validation image, once
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["source"] == "packed"
