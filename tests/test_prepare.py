"""The launch lists a folder dataset once: the listing its pre-flight check reads is the
index every worker trains from, and it is the loader's own listing of the dataset."""

import dataclasses
import gzip
import json

import pytest

from addertrain.config import from_dict
from addertrain.data.fake import write_fake
from addertrain.data.folder import INDEX, class_names, index_split
from addertrain.data.prepare import prepare_data
from addertrain.errors import UserError


def recipe(tmp_path, root, **data):
    (tmp_path / "run").mkdir(exist_ok=True)  # launch holds its lock file there
    return from_dict(
        {
            "run": {"dir": str(tmp_path), "name": "run"},
            "model": {"num_classes": 3},
            "data": {"source": "folder", "root": str(root), **data},
            "train": {"global_batch": 2, "micro_batch": 2},
        }
    )


def written_index(tmp_path) -> dict:
    with gzip.open(tmp_path / "run" / INDEX, "rt") as f:
        return json.load(f)["splits"]


def test_the_index_is_the_loaders_own_listing(tmp_path):
    root = write_fake(tmp_path / "ds", classes=3, per_class=4, val_per_class=2, sizes=(16, 16))
    (root / "train" / "c001" / "notes.txt").write_text("skipped by the loader")
    for image in (root / "val" / "c002").iterdir():  # a class without validation images
        image.unlink()
    assert prepare_data(recipe(tmp_path, root)) == ["c000", "c001", "c002"]
    classes = class_names(root, "train")
    assert written_index(tmp_path) == {
        s: dataclasses.asdict(index_split(root, s, classes)) for s in ("train", "val")
    }


def test_a_file_list_split_keeps_its_line_order(tmp_path):
    root = write_fake(tmp_path / "ds", classes=3, per_class=2, val_per_class=1, sizes=(16, 16))
    files = sorted(p.relative_to(root).as_posix() for p in (root / "train").rglob("*.JPEG"))
    lines = [f"{f} {int(f.split('/')[1][1:])}" for f in reversed(files)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text(lines[0] + "\n")
    prepare_data(recipe(tmp_path, root, train_split="train.txt", val_split="val.txt"))
    index = written_index(tmp_path)
    assert [p.removeprefix(f"{root}/") for p in index["train.txt"]["files"]] == list(
        reversed(files)
    )
    assert index["train.txt"]["classes"] == ["0", "1", "2"]


def test_a_bad_dataset_writes_no_index(tmp_path):
    root = write_fake(tmp_path / "ds", classes=3, per_class=2, val_per_class=1, sizes=(16, 16))
    (root / "train" / "c000" / "empty.JPEG").write_bytes(b"")
    with pytest.raises(UserError, match="cannot be trained on.*empty.JPEG"):
        prepare_data(recipe(tmp_path, root))
    assert not (tmp_path / "run" / INDEX).exists()


def test_a_relaunch_on_an_unchanged_tree_opens_no_file(tmp_path, monkeypatch):
    from addertrain.data import check

    root = write_fake(tmp_path / "ds", classes=3, per_class=2, val_per_class=1, sizes=(16, 16))
    cfg = recipe(tmp_path, root)
    cfg.run.data_check = "full"
    opened = []
    sniff_all = check.sniff_all
    monkeypatch.setattr(
        check, "sniff_all", lambda r, files: opened.append(len(files)) or sniff_all(r, files)
    )
    prepare_data(cfg)
    prepare_data(cfg)
    assert opened == [9]  # the second launch reused the first one's result
    (root / "train" / "c000" / "new.JPEG").write_bytes(b"not an image")
    with pytest.raises(UserError, match="new.JPEG"):
        prepare_data(cfg)
    assert opened == [9, 10]
