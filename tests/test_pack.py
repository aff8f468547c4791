"""`addertrain data pack`: folder and ILSVRC sources, the shard format, resume, bad input."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from addertrain.data import shards
from addertrain.data.check import check_listed, layout
from addertrain.data.fake import write_fake
from addertrain.data.folder import class_names, index_split
from addertrain.data.pack import pack, pack_folder
from addertrain.errors import UserError
from conftest import cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_fake(tmp_path_factory.mktemp("fake") / "src", 3, 8, 2, sizes=(16, 24))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_sample(root: Path, manifest, split: str, row) -> bytes:
    with open(root / manifest.splits[split].shards[row["shard"]].name, "rb") as f:
        f.seek(int(row["offset"]))
        return f.read(int(row["size"]))


def test_folder_pack_matches_folder_index(folder, tmp_path):
    dst = tmp_path / "p"
    pack_folder(folder, dst, 6000)
    manifest = shards.load_manifest(dst)
    classes = class_names(folder, "train")
    assert manifest.classes == classes
    for split in ("train", "val"):
        index = index_split(folder, split, classes)
        table = shards.sample_table(dst, split)
        keys = (dst / f"{split}.keys.txt").read_text().split()
        assert keys == [f"{Path(f).parent.name}/{Path(f).stem}" for f in index.files]
        assert table["label"].tolist() == index.labels
        for f, row in zip(index.files, table):
            assert read_sample(dst, manifest, split, row) == Path(f).read_bytes()
        assert len(manifest.splits[split].shards) > 1
        shards.stat_shards(manifest, split)
    # the index files are what DALI's own tool writes, and tarfile reads the shards
    tar = dst / "train-000000.tar"
    wds2idx = Path(sys.executable).with_name("wds2idx")
    subprocess.run([wds2idx, tar, tmp_path / "ref.idx"], check=True, capture_output=True)
    assert (tmp_path / "ref.idx").read_text() == (dst / "train-000000.idx").read_text()
    with tarfile.open(tar) as t:
        names = t.getnames()
    assert names[0].endswith(".jpg") and names[1].endswith(".cls")
    assert shards.verify_shards(manifest, workers=2, progress=False) == []


def _train_keys_in_shard_order(dst: Path) -> list[str]:
    names = []
    for s in shards.load_manifest(dst).splits["train"].shards:
        with tarfile.open(dst / s.name) as t:
            names += [n[:-4] for n in t.getnames() if n.endswith(".jpg")]
    return names


def test_seed_shuffles_and_workers_do_not_matter(folder, tmp_path):
    pack_folder(folder, tmp_path / "a", 6000, seed=0, workers=1)
    pack_folder(folder, tmp_path / "b", 6000, seed=0, workers=2)
    pack_folder(folder, tmp_path / "c", 6000, seed=1, workers=2)
    a, b = (shards.load_manifest(tmp_path / x) for x in "ab")
    assert a.splits == b.splits  # names, sizes, sha256 per shard
    order_a, order_c = (_train_keys_in_shard_order(tmp_path / x) for x in "ac")
    canonical = (tmp_path / "a" / "train.keys.txt").read_text().split()
    assert sorted(order_a) == sorted(canonical) and order_a != canonical and order_a != order_c
    # the sample table stays canonical whatever the seed
    assert (tmp_path / "c" / "train.keys.txt").read_text().split() == canonical


def _jpeg(n: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (n * 20 % 255, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


WNIDS = ["n03000000", "n01000000", "n04000000", "n02000000"]  # meta.mat order, not sorted


def make_raw(root: Path, val_truth: list[int] | None = None, bad_member: bool = False) -> Path:
    """ILSVRC2012 tars of 4 wnids x 3 images, 8 val images, and a devkit whose meta.mat
    lists the wnids in WNIDS order (ILSVRC2012_ID 1..4)."""
    import scipy.io

    root.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for c, w in enumerate(WNIDS):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(3):
                    data = b"GIF89a" if bad_member and c == 1 and i == 2 else _jpeg(c * 3 + i)
                    _add(inner, f"{w}_{i}.JPEG", data)
            _add(outer, f"{w}.tar", buf.getvalue())
    truth = val_truth or [1, 2, 3, 4, 4, 3, 2, 1]  # ILSVRC2012_IDs, val file-name order
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        for k in range(8):
            _add(val, f"ILSVRC2012_val_{k + 1:08d}.JPEG", _jpeg(100 + k))
    synsets = np.array(
        [(i + 1, w, f"class {w}", 0) for i, w in enumerate(WNIDS)]
        + [(5, "n09999999", "a parent synset", 4)],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")],
    )
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    with tarfile.open(root / "devkit.tar.gz", "w:gz") as dk:
        _add(dk, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        text = "".join(f"{i}\n" for i in truth).encode()
        _add(dk, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", text)
    return root


def test_raw_tars_with_devkit_and_kaggle_labels(tmp_path):
    raw = make_raw(tmp_path / "raw")
    r = cli("data", "pack", raw, tmp_path / "p", "--devkit", raw / "devkit.tar.gz", "--workers", 2)
    assert r.returncode == 0, r.stderr
    m = shards.load_manifest(tmp_path / "p")
    assert m.classes == sorted(WNIDS) and m.source["kind"] == "ilsvrc-tars"
    sorted_id = {w: sorted(WNIDS).index(w) for w in WNIDS}
    expected = [sorted_id[WNIDS[i - 1]] for i in [1, 2, 3, 4, 4, 3, 2, 1]]
    assert shards.sample_table(tmp_path / "p", "val")["label"].tolist() == expected
    train = shards.sample_table(tmp_path / "p", "train")
    assert train["label"].tolist() == [c for c in range(4) for _ in range(3)]
    assert read_sample(
        tmp_path / "p", m, "val", shards.sample_table(tmp_path / "p", "val")[3]
    ) == _jpeg(103)
    # Kaggle's LOC_val_solution.csv next to the tars gives the same labels
    lines = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{k + 1:08d},{WNIDS[i - 1]} 1 2 3 4 {WNIDS[0]} 5 6 7 8"
        for k, i in enumerate([1, 2, 3, 4, 4, 3, 2, 1])
    ]
    (raw / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    pack(raw, tmp_path / "k", 4096, progress=False)
    assert shards.sample_table(tmp_path / "k", "val")["label"].tolist() == expected


def test_flat_val_with_label_list(folder, tmp_path):
    src = tmp_path / "flat"
    (src / "val").mkdir(parents=True)
    os.symlink(folder / "train", src / "train")
    classes = class_names(folder, "train")
    lines = []
    for c, name in enumerate(classes):
        for f in sorted((folder / "val" / name).iterdir()):
            (src / "val" / f.name).write_bytes(f.read_bytes())
            lines.append(f"{f.name} {c}")
    (src / "val" / "val.txt").write_text("\n".join(lines) + "\n")
    # the folder reader takes the flat folder with its list of numeric labels
    splits, problems = layout(src, "train", "val/val.txt")
    assert not problems["unknown_val_class"]
    assert check_listed(src, splits, problems)["images"]["val/val.txt"] == len(lines)
    index = index_split(src, "val/val.txt", classes)
    # and the packer, with the same list given as --val-labels
    pack(src, tmp_path / "p", 6000, val_labels=src / "val" / "val.txt", progress=False)
    table = shards.sample_table(tmp_path / "p", "val")
    by_key = dict(zip((tmp_path / "p" / "val.keys.txt").read_text().split(), table["label"]))
    assert {Path(f).stem: y for f, y in zip(index.files, index.labels)} == by_key
    # labels beyond the training classes are refused
    (src / "val" / "bad.txt").write_text(lines[0].rsplit(" ", 1)[0] + " 7\n")
    _, problems = layout(src, "train", "val/bad.txt")
    assert problems["unknown_val_class"]


def test_full_check_is_reused_until_the_tree_changes(tmp_path):
    root = write_fake(tmp_path / "d", 2, 3, 1, sizes=(16, 16))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert check_listed(root, *layout(root, "train", "val"), cache_dir=run_dir)["checked"] == 8
    assert check_listed(root, *layout(root, "train", "val"), cache_dir=run_dir)["checked"] == 0
    (root / "train" / "c000" / "new.JPEG").write_bytes(b"not an image")
    with pytest.raises(UserError, match="new.JPEG"):
        check_listed(root, *layout(root, "train", "val"), cache_dir=run_dir)


def test_restart_keeps_finished_shards(folder, tmp_path):
    ref, dst = tmp_path / "ref", tmp_path / "p"
    pack_folder(folder, ref, 6000)
    pack_folder(folder, dst, 6000)
    names = [s.name for s in shards.load_manifest(dst).splits["train"].shards]
    # what a kill leaves: no manifest, a temporary file, a shard never renamed, one half-written
    (dst / "manifest.json").unlink()
    (dst / names[1]).unlink()
    (dst / f".{names[1]}.tmp").write_bytes(b"partial")
    with open(dst / names[2], "r+b") as f:
        f.truncate(1000)
    before = {n: os.stat(dst / n) for n in names if n not in names[1:3]}
    r = cli("data", "pack", folder, dst, "--shard-size", 6000, "--workers", 2)
    assert r.returncode == 0, r.stderr
    for n, st in before.items():
        now = os.stat(dst / n)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n
    assert shards.load_manifest(dst).splits == shards.load_manifest(ref).splits
    assert sha(dst / names[2]) == sha(ref / names[2])


def test_a_repack_of_a_smaller_source_leaves_only_what_the_manifest_names(tmp_path):
    src = write_fake(tmp_path / "src", 3, 8, 2, sizes=(16, 24))
    dst = tmp_path / "p"
    pack_folder(src, dst, 6000)
    before = sorted(p.name for p in dst.glob("train-*.tar"))
    for img in sorted((src / "train" / "c002").iterdir())[2:]:
        img.unlink()
    shutil.rmtree(src / "val")
    pack_folder(src, dst, 6000)
    m = shards.load_manifest(dst)
    named = sorted(s.name for s in m.splits["train"].shards)
    assert len(named) < len(before) and set(m.splits) == {"train"}
    assert sorted(p.name for p in dst.glob("*.tar")) == named
    assert sorted(p.name for p in dst.glob("*.idx")) == [shards.index_name(n) for n in named]
    assert not list(dst.glob("val.*")) and m.splits["train"].per_class == [8, 8, 2]
    r = cli("data", "check", dst)
    assert r.returncode == 0, r.stdout + r.stderr


def one_line_error(r, *words) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    err = [x for x in lines if x.startswith("addertrain: error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in err[0], err[0]


def test_damaged_packed_sets(folder, tmp_path):
    dst = tmp_path / "p"
    pack_folder(folder, dst, 6000)
    m = shards.load_manifest(dst)
    first, second = m.splits["train"].shards[:2]
    data = bytearray((dst / first.name).read_bytes())
    data[600] ^= 0xFF
    (dst / first.name).write_bytes(bytes(data))  # same size: only sha256 finds it
    (dst / second.name).unlink()
    r = cli("data", "check", dst, "--workers", 2)
    assert r.returncode == 2
    assert f"{first.name}: sha256 differs" in r.stdout and f"{second.name}: cannot read" in r.stdout
    with pytest.raises(UserError, match=f"{second.name}.*addertrain data pack"):
        shards.stat_shards(m, "train")
    meta = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps({**meta, "format": 2}))
    one_line_error(cli("data", "check", dst), "manifest.json", "format 2")


def test_bad_sources(folder, tmp_path):
    raw = make_raw(tmp_path / "raw", val_truth=[1, 2, 3])
    one_line_error(
        cli("data", "pack", raw, tmp_path / "a", "--devkit", raw / "devkit.tar.gz"),
        "devkit",
        "3 validation images",
        "has 8",
    )
    raw2 = make_raw(tmp_path / "raw2", val_truth=[1, 2, 3, 4, 5, 1, 1, 1])
    one_line_error(
        cli("data", "pack", raw2, tmp_path / "a", "--devkit", raw2 / "devkit.tar.gz"),
        "ILSVRC2012_ID 5",
    )
    raw3 = make_raw(tmp_path / "raw3", bad_member=True)
    one_line_error(cli("data", "pack", raw3, tmp_path / "a"), "n01000000_2.JPEG", "not a JPEG")
    assert not (tmp_path / "a" / "manifest.json").exists()
    dup = tmp_path / "dup"
    write_fake(dup, 2, 2, 1, sizes=(16, 16))
    img = next((dup / "train" / "c000").iterdir())
    # class folders may repeat a name; a dot in the stem may not make two keys equal
    (dup / "train" / "c001" / img.name).write_bytes(img.read_bytes())
    (dup / "train" / "c000" / f"x.y{img.suffix}").write_bytes(img.read_bytes())
    (dup / "train" / "c000" / f"x_y{img.suffix}").write_bytes(img.read_bytes())
    one_line_error(cli("data", "pack", dup, tmp_path / "b"), "duplicate key", "c000/x_y")
    png = tmp_path / "png"
    write_fake(png, 2, 2, 1, sizes=(16, 16))
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png / "train" / "c000" / "x.png")
    one_line_error(cli("data", "pack", png, tmp_path / "c"), "x.png", "not a JPEG")
    labels = tmp_path / "labels.txt"
    labels.write_text("x.JPEG 0\n")
    one_line_error(
        cli("data", "pack", folder, tmp_path / "d", "--val-labels", labels),
        "has class folders",
        "leave out --val-labels",
    )
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_bad_destinations(folder, tmp_path):
    (tmp_path / "file").write_text("")
    one_line_error(cli("data", "pack", folder, tmp_path / "file" / "dst"), "cannot write")
    assert cli("data", "pack", folder, tmp_path / "d", "--shard-size", 6000).returncode == 0
    one_line_error(
        cli("data", "pack", folder, tmp_path / "d", "--shard-size", 6000, "--seed", 3),
        "other arguments",
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_disk_full(folder, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60k", "tmpfs", small], check=True)
    try:
        r = cli("data", "pack", folder, small / "p", "--shard-size", 6000, "--workers", 1)
        one_line_error(r, "disk", "full", "free")
        assert not (small / "p" / "manifest.json").exists()
        assert not [p for p in (small / "p").iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", small], check=True)


def test_killed_pack_resumes(folder, tmp_path):
    """SIGKILL once the first shard is recorded, then run again: the recorded shards are kept
    (same inode and mtime), the result equals an uninterrupted pack."""
    from conftest import cli_command

    ref, dst = tmp_path / "ref", tmp_path / "p"
    pack_folder(folder, ref, 2048)
    args = [*cli_command("data", "pack", folder, dst, "--shard-size", 2048, "--workers", 1)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = dst / ".pack-state"
    while proc.poll() is None and not list(state.glob("train-*.json")):
        pass
    proc.kill()
    proc.wait()
    assert not (dst / "manifest.json").exists(), "the pack finished before it could be killed"
    kept = {p.name[:-5]: os.stat(dst / p.name[:-5]) for p in state.glob("train-*.json")}
    assert kept
    assert cli("data", "pack", folder, dst, "--shard-size", 2048, "--workers", 1).returncode == 0
    for name, st in kept.items():
        now = os.stat(dst / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    assert shards.load_manifest(dst).splits == shards.load_manifest(ref).splits
    assert not list(dst.glob(".*.tmp"))
