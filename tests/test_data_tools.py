"""Dataset tools: sharding arithmetic, folder index, data check, digits, fake, and their CLI."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from addertrain.data import sharding
from addertrain.data.check import quick_check, scan
from addertrain.data.digits import prepare_digits, split_indices
from addertrain.data.fake import write_fake
from addertrain.data.folder import class_names, index_split, save_class_map
from addertrain.errors import UserError
from conftest import cli


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 23, 64, 65])
@pytest.mark.parametrize("shards,batch", [(1, 4), (2, 4), (3, 5), (4, 1)])
def test_shards_cover_every_sample_once_with_equal_steps(n, shards, batch):
    order = np.random.default_rng(n).permutation(n)
    steps = sharding.steps_per_epoch(n, shards, batch)
    real = []
    for s in range(shards):
        indices, valid = sharding.shard_layout(order, shards, batch, s)
        assert len(indices) == steps * batch and len(valid) == steps
        assert all(0 <= v <= batch for v in valid) and valid[:-1] == [batch] * (steps - 1)
        assert set(indices.tolist()) <= set(range(n))
        real += [int(i) for t, v in enumerate(valid) for i in indices[t * batch : t * batch + v]]
    assert sorted(real) == list(range(n))


@pytest.mark.parametrize("n", [1, 7, 23, 64, 65, 100])
def test_an_optimizer_step_reads_the_same_samples_whatever_the_split(n):
    # global batch 8 as 1 worker x 8, 2 x 4, 1 x 4 accumulating 2, 2 x 2 accumulating 2, ...
    order = np.random.default_rng(n).permutation(n)
    per_split = []
    for shards, batch, group in [(1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2), (4, 1, 2), (1, 1, 8)]:
        steps = sharding.steps_per_epoch(n, shards, batch, group)
        assert steps == group * -(-n // 8)
        layouts = [sharding.shard_layout(order, shards, batch, s, group) for s in range(shards)]
        per_step = []
        for opt in range(steps // group):
            real = set()
            for indices, valid in layouts:
                for t in range(opt * group, (opt + 1) * group):
                    real |= {int(i) for i in indices[t * batch : t * batch + valid[t]]}
            per_step.append(real)
        assert sorted(i for step in per_step for i in step) == list(range(n))
        per_split.append(per_step)
    assert all(p == per_split[0] for p in per_split)


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = sharding.epoch_order(50, seed=1, epoch=2, shuffle=True)
    assert np.array_equal(a, sharding.epoch_order(50, seed=1, epoch=2, shuffle=True))
    assert not np.array_equal(a, sharding.epoch_order(50, seed=1, epoch=3, shuffle=True))
    assert np.array_equal(sharding.epoch_order(5, 1, 2, shuffle=False), np.arange(5))


def test_class_map_is_sorted_and_saved(tmp_path):
    for c in ("zebra", "ant", "moth"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "train" / c / "x.JPEG")
    classes = class_names(tmp_path / "data", "train")
    assert classes == ["ant", "moth", "zebra"]
    index = index_split(tmp_path / "data", "train", classes)
    assert index.labels == [0, 1, 2] and index.files[2].endswith("zebra/x.JPEG")
    path = save_class_map(classes, tmp_path / "run")
    assert json.loads(path.read_text()) == {"ant": 0, "moth": 1, "zebra": 2}


def test_file_list_split(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{i}.jpg")
    (tmp_path / "train.txt").write_text("img/0.jpg 1\nimg/1.jpg 0\n\nimg/2.jpg 1\n")
    classes = class_names(tmp_path, "train.txt")
    assert classes == ["0", "1"]
    index = index_split(tmp_path, "train.txt", classes)
    assert index.labels == [1, 0, 1] and index.files[1] == str(tmp_path / "img" / "1.jpg")
    (tmp_path / "bad.txt").write_text("img/0.jpg one\n")
    with pytest.raises(UserError, match="bad.txt:1"):
        index_split(tmp_path, "bad.txt", classes)


# -- data check -------------------------------------------------------------------------


@pytest.fixture
def defective(tmp_path):
    """A fake dataset seeded with one instance of every defect `data check` reports."""
    root = write_fake(tmp_path / "ds", classes=3, per_class=4, val_per_class=2, sizes=(16, 40))
    train, val = root / "train", root / "val"
    victim = sorted((train / "c001").iterdir())[0]
    data = victim.read_bytes()
    (train / "c001" / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (20, 20), (9, 9, 9)).save(train / "c000" / "png.JPEG", format="PNG")
    (train / "c003").mkdir()
    shutil.rmtree(val / "c002")
    shutil.copy(victim, val / "c001" / "copy.JPEG")
    (val / "zzz").mkdir()
    shutil.copy(sorted((val / "c000").iterdir())[0], val / "zzz" / "a.JPEG")
    (train / "c000" / "notes.txt").write_text("not an image")
    return root


def test_check_reports_every_seeded_defect(defective):
    report = scan(defective, workers=1)
    found = {p["kind"]: p for p in report["problems"]}
    assert found["unreadable"]["files"][0].startswith("train/c001/truncated.JPEG")
    assert found["not_jpeg"]["files"] == ["train/c000/png.JPEG (PNG)"]
    assert found["empty_class"]["files"] == ["train/c003"]
    assert found["missing_from_val"]["files"] == ["train/c002"]
    assert found["unknown_val_class"]["files"] == ["val/zzz"]
    victim = sorted((defective / "train" / "c001").iterdir())[0].name
    assert found["duplicate"]["files"] == [f"val/c001/copy.JPEG == train/c001/{victim}"]
    assert found["ignored"]["files"] == ["train/c000/notes.txt"]
    modes = {}
    for path in sorted(defective.glob("*/*/*.JPEG")):
        if path.name == "truncated.JPEG":
            continue
        with Image.open(path) as img:
            modes.setdefault(img.mode, []).append(str(path.relative_to(defective)))
    assert found["cmyk"]["files"] == modes["CMYK"]
    assert set(found["grayscale"]["files"]) == set(modes["L"])
    assert report["errors"] == 3 and found["unreadable"]["severity"] == "error"
    assert found["duplicate"]["severity"] == "warning"


def test_check_passes_a_clean_dataset(tmp_path):
    root = write_fake(tmp_path, classes=2, per_class=3, val_per_class=1, sizes=(16, 24))
    report = scan(root, workers=1)
    assert report["errors"] == 0
    assert report["splits"] == {
        "train": {"classes": 2, "images": 6},
        "val": {"classes": 2, "images": 2},
    }
    assert quick_check(root) == {
        "classes": 2,
        "images": {"train": 6, "val": 2},
        "checked": 8,
        "warnings": {},
    }


def test_quick_check_stops_bad_layouts_with_clear_messages(tmp_path, defective):
    with pytest.raises(UserError, match="does not exist"):
        quick_check(tmp_path / "missing")
    with pytest.raises(UserError, match=r"cannot be trained on.*train/c003.*val/zzz"):
        quick_check(defective)
    only_train = write_fake(tmp_path / "t", classes=2, per_class=1, val_per_class=0, sizes=(16, 16))
    shutil.rmtree(only_train / "val")
    with pytest.raises(UserError, match="missing: val"):
        quick_check(only_train)


def test_check_cli_exit_codes_and_json(tmp_path, defective):
    out = cli("data", "check", defective, "--json", tmp_path / "r.json", "--workers", "1")
    assert out.returncode == 2, out.stderr
    assert "cannot be trained on" in out.stdout and "unreadable" in out.stdout
    assert "Traceback" not in out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["errors"] == 3
    missing = cli("data", "check", tmp_path / "nope", "--json", tmp_path / "n.json")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_check_cli_lists_every_file_up_to_a_limit_and_writes_json_only_when_asked(tmp_path):
    root = write_fake(tmp_path / "ds", classes=2, per_class=2, val_per_class=1, sizes=(16, 16))
    for i in range(25):
        (root / "train" / "c000" / f"empty{i:02d}.JPEG").write_bytes(b"")
    (root / "train" / "c001" / "text.jpg").write_text("hello")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = cli("data", "check", root, "--workers", "1", cwd=cwd)
    assert out.returncode == 2, out.stderr
    lines = out.stdout.splitlines()
    assert "unreadable (error, 26): missing, empty, truncated or not an image" in out.stdout
    listed = [line.strip() for line in lines if line.endswith("(empty file)")]
    assert listed == [f"train/c000/empty{i:02d}.JPEG (empty file)" for i in range(20)]
    assert "  ... and 6 more (--show 0 or --json lists all)" in lines
    assert not list(cwd.iterdir())  # no report written unasked
    everything = cli("data", "check", root, "--workers", "1", "--show", "0")
    assert "train/c000/empty24.JPEG (empty file)" in everything.stdout
    assert "train/c001/text.jpg (not an image: starts with 68 65 6c 6c 6f)" in everything.stdout
    assert "more (--show 0" not in everything.stdout


# -- what the loader refuses, the checker reports -----------------------------------------


@pytest.fixture
def odd_entries(tmp_path):
    """A clean dataset plus, in train/c000, a folder named like an image, a broken symlink
    and a symlink loop."""
    root = write_fake(tmp_path / "ds", classes=2, per_class=2, val_per_class=1, sizes=(16, 16))
    c000 = root / "train" / "c000"
    (c000 / "x.JPEG").mkdir()
    (c000 / "gone.JPEG").symlink_to(c000 / "nowhere.JPEG")
    (c000 / "loop.JPEG").symlink_to(c000 / "loop.JPEG")
    return root


def test_checker_and_loader_agree_on_odd_entries(odd_entries):
    expected = [
        "train/c000/gone.JPEG (missing or a broken symlink)",
        "train/c000/loop.JPEG (symlink loop)",
        "train/c000/x.JPEG (a folder named like an image)",
    ]
    report = scan(odd_entries)
    found = {p["kind"]: p["files"] for p in report["problems"]}
    assert found["bad_entry"] == expected and report["errors"] == 3
    with pytest.raises(
        UserError,
        match=r"c000 holds entries the loader cannot read: gone.JPEG "
        r"\(missing or a broken symlink\), loop.JPEG \(symlink loop\), "
        r"x.JPEG \(a folder named like an image\)",
    ):
        index_split(odd_entries, "train", class_names(odd_entries, "train"))
    with pytest.raises(UserError, match="train/c000/gone.JPEG.*addertrain data check"):
        quick_check(odd_entries)


def test_a_class_folder_that_is_a_symlink_loop_is_refused(tmp_path):
    root = write_fake(tmp_path / "ds", classes=2, per_class=2, val_per_class=1, sizes=(16, 16))
    (root / "train" / "c002").symlink_to(root / "train" / "c002")
    report = scan(root)
    assert {p["kind"]: p["files"] for p in report["problems"]}["bad_entry"] == [
        "train/c002 (symlink loop)"
    ]
    assert report["errors"] == 1
    with pytest.raises(UserError, match=r"entries the loader cannot read: c002 \(symlink loop\)"):
        class_names(root, "train")


def test_checker_and_loader_agree_on_file_list_lines(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{i}.jpg")
    (tmp_path / "train.txt").write_text(
        "img/0.jpg 0\nimg/1.jpg\t1\nimg/2.jpg one\nimg/2.jpg \u00b2\n"
    )
    (tmp_path / "val.txt").write_text("img/0.jpg 0\n")
    found = {p["kind"]: p["files"] for p in scan(tmp_path, "train.txt", "val.txt")["problems"]}
    assert found["bad_list_line"] == [
        "train.txt:3: 'img/2.jpg one'",
        "train.txt:4: 'img/2.jpg \u00b2'",
    ]
    with pytest.raises(UserError, match=r"train.txt:3: 'img/2.jpg one', .*train.txt:4: "):
        class_names(tmp_path, "train.txt")
    (tmp_path / "train.txt").write_text("img/0.jpg 0\nimg/1.jpg\t1\n")  # a tab separates too
    assert index_split(tmp_path, "train.txt", ["0", "1"]).labels == [0, 1]
    assert scan(tmp_path, "train.txt", "val.txt")["errors"] == 0


def test_quick_check_opens_every_file_it_will_read(tmp_path):
    root = write_fake(tmp_path / "ds", classes=2, per_class=3, val_per_class=1, sizes=(16, 16))
    good = sorted((root / "train" / "c001").iterdir())[0].read_bytes()
    (root / "train" / "c000" / "empty.JPEG").write_bytes(b"")
    (root / "val" / "c001" / "page.png").write_text("<html>")
    (root / "train" / "c001" / "cut.JPEG").write_bytes(
        good[:40]
    )  # passes: truncation needs a decode
    with pytest.raises(UserError) as err:
        quick_check(root)
    message = str(err.value)
    assert "train/c000/empty.JPEG (empty file)" in message
    assert "val/c001/page.png (not an image: starts with 3c 68 74 6d 6c 3e)" in message
    assert "cut.JPEG" not in message and f"Run `addertrain data check {root}`" in message
    with pytest.raises(UserError) as err:
        quick_check(root, read=("val",))  # what `addertrain eval` reads
    assert "page.png" in str(err.value) and "empty.JPEG" not in str(err.value)
    with pytest.raises(UserError) as err:
        quick_check(root, sample=2)  # an even sample: files 0 (empty.JPEG) and 5 of 11
    assert "empty.JPEG" in str(err.value) and "page.png" not in str(err.value)


def test_fake_cli(tmp_path):
    out = cli("data", "fake", tmp_path / "f", "--classes", "2", "--per-class", "3")
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "f" / "train").glob("*/*.JPEG"))) == 6
    again = cli("data", "fake", tmp_path / "f", "--classes", "2", "--per-class", "3")
    assert (
        again.returncode == 2
        and "already holds" in again.stderr
        and "Traceback" not in again.stderr
    )


# -- digits -----------------------------------------------------------------------------


def test_digits_split_is_stratified_and_fixed():
    from sklearn.datasets import load_digits

    targets = load_digits().target
    train, val = split_indices(targets)
    assert (train, val) == split_indices(targets)
    assert sorted(train + val) == list(range(1797))
    for c in range(10):
        n = int((targets == c).sum())
        assert int((targets[val] == c).sum()) == round(0.2 * n)


def test_prepare_digits_writes_an_imagenet_folder_once(tmp_path):
    root = prepare_digits(tmp_path / "digits", size=16)
    train = sorted((root / "train").glob("*/*.JPEG"))
    val = sorted((root / "val").glob("*/*.JPEG"))
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert class_names(root, "train") == [str(d) for d in range(10)]
    assert sorted(p.name for p in (root / "val").iterdir()) == [str(d) for d in range(10)]
    with Image.open(train[0]) as img:
        assert img.size == (16, 16) and img.mode == "RGB" and img.format == "JPEG"
    assert quick_check(root)["images"] == {"train": 1438, "val": 359}
    stamp = train[0].stat().st_mtime_ns
    assert prepare_digits(root, size=16) == root and train[0].stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".digits.tmp-*"))
    with pytest.raises(UserError, match="16x16, not 32x32"):
        prepare_digits(root, size=32)
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="not a digits dataset"):
        prepare_digits(tmp_path / "other")


# -- benchmark --------------------------------------------------------------------------


def test_bench_data_cli_writes_both_sides(tmp_path):
    root = write_fake(tmp_path / "ds", classes=2, per_class=8, val_per_class=1, sizes=(24, 48))
    out = cli(
        "bench",
        "data",
        root,
        "--image-size",
        "16",
        "--batch",
        "4",
        "--workers",
        "1",
        "--batches",
        "2",
        "--warmup",
        "1",
        "--json",
        tmp_path / "b.json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    for side in ("dali", "torch"):
        assert result[side]["images"] == 8 and result[side]["img_per_s"] > 0
    assert result["ratio_dali_over_torch"] == pytest.approx(
        result["dali"]["img_per_s"] / result["torch"]["img_per_s"]
    )
    assert "ratio DALI / DataLoader" in out.stdout
    # folder vs its packed copy, side by side at each injected latency of every open
    compared = result["folder_vs_packed"]
    assert compared["latencies_ms"] == [0.0, 0.5, 2.0]
    for source in ("folder", "packed"):
        for ms in compared["latencies_ms"]:
            for kind in ("read", "decoded"):
                assert compared["sources"][source][str(ms)][kind]["img_per_s"] > 0
    opens = compared["opens"]
    # an epoch opens every image of the folder, and no more than the shards it reads packed
    assert opens["folder"]["opens_per_epoch"] >= 16
    assert 1 <= opens["packed"]["opens_per_epoch"] <= opens["packed"]["shards_read"]
    assert [t["target"] for t in result["targets"]][2] == "packed opens per epoch <= shards read"
    assert result["targets"][2]["met"] is True
