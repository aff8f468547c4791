"""The DALI folder pipelines on CPU (device_id=None): batches, labels, sharding, order, resume."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from addertrain.config import DataConfig
from addertrain.data.dali import build_folder_loader
from addertrain.data.fake import class_level, write_fake
from addertrain.errors import UserError

CPU = torch.device("cpu")
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
COUNTS = {"a": 11, "b": 12}  # 23 images: batches and shards never divide them evenly


def level(j: int) -> int:
    return 10 + 5 * j  # 46 images (train and val) between 10 and 235


@pytest.fixture(scope="module")
def ident(tmp_path_factory):
    """Solid gray images, image j at gray level(j): a decoded crop tells which image it is."""
    root = tmp_path_factory.mktemp("ident")
    j = 0
    for split in ("train", "val"):
        for c, n in COUNTS.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                size = (20 + 3 * (j % 5), 20 + 5 * (j % 3))
                Image.new("RGB", size, (level(j),) * 3).save(
                    root / split / c / f"{i:02d}.JPEG", quality=95
                )
                j += 1
    return root


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """Noisy images: every crop and flip shows in the pixels."""
    return write_fake(
        tmp_path_factory.mktemp("textured"),
        classes=2,
        per_class=11,
        val_per_class=1,
        sizes=(20, 40),
    )


def cfg(root, **kw) -> DataConfig:
    return DataConfig(
        source="folder",
        root=str(root),
        image_size=16,
        crop_scale=(0.25, 1.0),
        mean=MEAN,
        std=STD,
        threads=1,
        **kw,
    )


def pixel_levels(images: torch.Tensor) -> torch.Tensor:
    """Undo the normalization: [B, C] mean 0-255 value of each channel."""
    m, s = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return ((images * s + m) * 255).mean(dim=(2, 3))


def image_ids(images, labels, valid, first: int) -> list[int]:
    """Which ident image each real sample is, checking its label and normalization on the way."""
    levels = pixel_levels(images[:valid])
    # Every channel of a gray image comes back to the same level only if each channel's
    # mean and std were applied.
    assert (levels.max(1).values - levels.min(1).values).max() < 1.5
    ids = ((levels.mean(1) - 10) / 5).round().long()
    assert (levels.mean(1) - (10 + 5 * ids)).abs().max() < 1.5
    ids -= first
    assert ids.min() >= 0 and ids.max() < 23
    expected = (ids >= COUNTS["a"]).long()  # class a comes first in the sorted class map
    assert torch.equal(labels[:valid], expected)
    return ids.tolist()


def epoch_ids(loader, first: int) -> list[int]:
    return [i for images, labels, valid in loader for i in image_ids(images, labels, valid, first)]


@pytest.mark.parametrize("rrc", [True, False])
def test_train_batches_have_shapes_dtypes_labels_and_normalization(ident, rrc):
    loader = build_folder_loader(
        cfg(ident, random_resized_crop=rrc), "train", 5, 0, 1, CPU, seed=0, training=True
    )
    assert loader.steps_per_epoch == 5
    batches = list(loader)
    assert len(batches) == 5
    for images, labels, valid in batches:
        assert images.shape == (5, 3, 16, 16) and images.dtype == torch.float32
        assert labels.shape == (5,) and labels.dtype == torch.int64
        image_ids(images, labels, valid, 0)
    assert [v for _, _, v in batches] == [5, 5, 5, 5, 3]


@pytest.mark.parametrize("split,first", [("train", 0), ("val", 23)])
def test_two_shards_read_every_image_exactly_once(ident, split, first):
    training = split == "train"
    loaders = [
        build_folder_loader(cfg(ident), split, 4, s, 2, CPU, seed=3, training=training)
        for s in range(2)
    ]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == 3
    ids = [epoch_ids(loader, first) for loader in loaders]
    assert sorted(ids[0] + ids[1]) == list(range(23))
    assert abs(len(ids[0]) - len(ids[1])) <= 1


def test_epochs_are_reshuffled_and_reproducible(ident):
    def loader():
        return build_folder_loader(cfg(ident), "train", 8, 0, 1, CPU, seed=5, training=True)

    a, b = loader(), loader()
    order0 = epoch_ids(a, 0)
    assert a.epoch == 1  # a finished epoch moves the loader to the next one
    order1 = epoch_ids(a, 0)
    a.set_epoch(3)
    order3 = epoch_ids(a, 0)
    assert sorted(order0) == sorted(order1) == sorted(order3) == list(range(23))
    assert len({tuple(order0), tuple(order1), tuple(order3)}) == 3
    assert epoch_ids(b, 0) == order0
    other = build_folder_loader(cfg(ident), "train", 8, 0, 1, CPU, seed=6, training=True)
    assert epoch_ids(other, 0) != order0


def test_augmentation_is_reproducible_given_the_seed(textured):
    def epoch(seed, epoch=0):
        loader = build_folder_loader(cfg(textured), "train", 8, 0, 1, CPU, seed=seed, training=True)
        loader.set_epoch(epoch)
        return torch.cat([x for x, _, _ in loader])

    first = epoch(5)
    assert torch.equal(first, epoch(5))
    assert not torch.equal(first, epoch(6))
    assert not torch.equal(first, epoch(5, epoch=1))


def test_eval_passes_are_identical(ident):
    loader = build_folder_loader(cfg(ident), "val", 8, 0, 1, CPU, seed=0, training=False)
    first = [x.clone() for x, _, _ in loader]
    again = [x for x, _, _ in loader]
    assert len(first) == len(again) == 3
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_restored_loader_yields_the_same_next_batches(textured):
    def loader():
        return build_folder_loader(cfg(textured), "train", 4, 1, 2, CPU, seed=11, training=True)

    original = loader()
    original.set_epoch(2)
    it = iter(original)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(original.state_dict()))
    assert (state["epoch"], state["step"]) == (2, 2)
    expected = [(x.clone(), y.clone(), v) for x, y, v in it]  # rest of epoch 2
    expected += [(x.clone(), y.clone(), v) for x, y, v in original][:2]  # start of epoch 3

    restored = loader()
    restored.load_state_dict(state)
    restored.set_epoch(2)  # what the trainer calls on resume: keeps the restored position
    assert restored.state_dict() == state
    got = list(restored) + list(restored)[:2]
    assert len(got) == len(expected) == 3
    for (x, y, v), (x2, y2, v2) in zip(expected, got):
        assert torch.equal(x, x2) and torch.equal(y, y2) and v == v2


def test_restoring_into_a_different_layout_is_refused(ident):
    one = build_folder_loader(cfg(ident), "train", 4, 0, 1, CPU, seed=0, training=True)
    next(iter(one))
    two = build_folder_loader(cfg(ident), "train", 4, 0, 2, CPU, seed=0, training=True)
    with pytest.raises(UserError, match="shards 1 -> 2"):
        two.load_state_dict(one.state_dict())


def test_a_resume_on_another_number_of_workers_continues_at_the_same_samples(ident):
    def loader(shard, shards, group):
        return build_folder_loader(
            cfg(ident), "train", 4, shard, shards, CPU, seed=3, training=True, group=group
        )

    # a global batch of 8: 2 workers x 4, then (from the checkpoint after step 1) 1 x 4 x 2
    two = [iter(loader(s, 2, 1)) for s in range(2)]
    step_1 = [i for it in two for i in image_ids(*next(it), 0)]
    after_1 = sorted(i for it in two for batch in it for i in image_ids(*batch, 0))
    one = loader(0, 1, 2)
    assert one.steps_per_epoch == 2 * 3
    one.seek(0, 2)
    it = iter(one)
    ids = image_ids(*next(it), 0)
    # a checkpoint after the seek restores the pipeline that began there
    state = json.loads(json.dumps(one.state_dict()))
    restored = loader(0, 1, 2)
    restored.load_state_dict(state)
    rest = [i for batch in it for i in image_ids(*batch, 0)]
    assert [i for batch in restored for i in image_ids(*batch, 0)] == rest
    assert sorted(ids + rest) == after_1
    assert sorted(step_1 + after_1) == list(range(23))


def test_gray_and_cmyk_jpegs_decode_to_rgb(tmp_path):
    write_fake(tmp_path, classes=3, per_class=2, val_per_class=3, sizes=(20, 40))
    loader = build_folder_loader(cfg(tmp_path), "val", 9, 0, 1, CPU, seed=0, training=False)
    images, labels, valid = next(iter(loader))
    assert valid == 9 and images.shape == (9, 3, 16, 16)
    modes = set()
    for x, y, path in zip(pixel_levels(images), labels, loader.index.files):
        with Image.open(path) as img:
            modes.add(img.mode)
            reference = np.asarray(img.convert("RGB"), dtype=np.float64).mean((0, 1))
        assert np.abs(x.numpy() - reference).max() < 6, path
        assert abs(x.mean().item() - class_level(int(y), 3)) < 8
    assert {"L", "CMYK", "RGB"} <= modes


def test_one_channel_output(ident):
    loader = build_folder_loader(
        cfg(ident, channels=1), "val", 4, 0, 1, CPU, seed=0, training=False
    )
    images, _, _ = next(iter(loader))
    assert images.shape == (4, 1, 16, 16)


def test_missing_or_empty_datasets_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_folder_loader(cfg(tmp_path / "nope"), "train", 4, 0, 1, CPU, 0, True)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        build_folder_loader(cfg(tmp_path), "train", 4, 0, 1, CPU, 0, True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "x.JPEG")
    with pytest.raises(UserError, match="no split 'val'"):
        build_folder_loader(cfg(tmp_path), "val", 4, 0, 1, CPU, 0, False)


def test_an_image_the_decoder_fails_on_is_named(tmp_path):
    root = write_fake(tmp_path, classes=2, per_class=4, val_per_class=1, sizes=(24, 24))
    victim = sorted((root / "train" / "c001").iterdir())[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # the first bytes still say JPEG
    loader = build_folder_loader(cfg(root), "train", 2, 0, 1, CPU, seed=0, training=True)
    with pytest.raises(
        UserError,
        match=rf"the image decoder failed on {re.escape(str(victim))} "
        rf"\(.*\); replace it .*addertrain data check {root}",
    ):
        for _ in loader:
            pass


def test_workers_read_the_index_the_launch_wrote(tmp_path):
    """The launch lists the dataset once; a worker (or a restarted one) reads that listing and
    does not walk the dataset again, so an image added later is not part of the run."""
    from addertrain.config import from_dict
    from addertrain.data.folder import INDEX, read_index
    from addertrain.data.prepare import prepare_data

    root = write_fake(tmp_path / "data", classes=2, per_class=5, val_per_class=2, sizes=(20, 24))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepare_data(
        from_dict(
            {
                "run": {"dir": str(tmp_path), "name": "run"},
                "model": {"num_classes": 2},
                "data": {"source": "folder", "root": str(root)},
                "train": {"global_batch": 2, "micro_batch": 2},
            }
        )
    )
    assert (run_dir / INDEX).is_file()
    Image.new("RGB", (20, 20)).save(
        root / "train" / sorted(p.name for p in (root / "train").iterdir())[0] / "added.JPEG"
    )
    d = cfg(root)
    indexed = build_folder_loader(
        d, "train", 2, 0, 1, CPU, seed=0, training=True, index_dir=run_dir
    )
    listed = build_folder_loader(d, "train", 2, 0, 1, CPU, seed=0, training=True)
    assert len(indexed.index.files) == 10 and len(listed.index.files) == 11
    assert indexed.index.classes == listed.index.classes
    assert len(read_index(str(root), "val", run_dir).files) == 4
    # another dataset root: the index is not this dataset's
    assert read_index(str(tmp_path / "elsewhere"), "train", run_dir) is None
