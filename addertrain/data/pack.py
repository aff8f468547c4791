"""``addertrain data pack SRC DST``: pack a dataset into shards (format in
:mod:`addertrain.data.shards`).

The packer first lists every sample with the byte range that holds its JPEG (a file of a
folder, or a member of an ILSVRC tar, found without unpacking), then plans the shards by
byte size, so the result depends on the data, ``--shard-size`` and ``--seed`` only, never on
``--workers``. Worker processes each write whole shards from the plan to a temporary name,
fsync and rename them, and record each finished shard's size and sha256 in
``DST/.pack-state/``: a killed pack run again keeps those shards and redoes the rest. The
sample tables and the manifest come last.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from addertrain.data import ilsvrc
from addertrain.data.ilsvrc import Member
from addertrain.data.shards import (
    MANIFEST,
    SAMPLE_DTYPE,
    ProgressLine,
    ShardInfo,
    SplitInfo,
    index_name,
    keys_path,
    manifest_dict,
    shard_files,
    shard_name,
    table_path,
    write_json_atomic,
)
from addertrain.errors import UserError

HELP = "pack a folder dataset or the ILSVRC2012 tars into WebDataset shards (data.source: packed)"
STATE = ".pack-state"
SPLITS = ("train", "val")
BLOCK = 512
GiB = 1 << 30


@dataclass(frozen=True)
class Split:
    """A split in canonical order (sorted class, then sorted file name)."""

    keys: list[str]
    labels: list[int]
    members: list[Member]


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _key(m: Member, by_class: bool) -> str:
    # WebDataset splits a member's base name at its first dot: the stem may hold none. Class
    # folders may repeat file names (0001.png in every class), so their keys name the class.
    stem = Path(m.name).stem.replace(".", "_")
    return f"{m.group}/{stem}" if by_class else stem


def _where(m: Member) -> str:
    if m.offset == 0 and Path(m.path).name == m.name:
        return m.path
    return f"{m.path}:{m.group + '.tar/' if m.group else ''}{m.name}"


def _split(members: list[Member], labels: list[int], what: str, by_class: bool = False) -> Split:
    keys = [_key(m, by_class) for m in members]
    seen: dict[str, Member] = {}
    for k, m in zip(keys, members):
        if k in seen:
            raise UserError(
                f"duplicate key {k!r} in {what}: {_where(seen[k])} and {_where(m)}; rename or "
                "remove one of them"
            )
        seen[k] = m
    return Split(keys, labels, members)


# -- sources -------------------------------------------------------------------------------


def _file_member(path: str) -> Member:
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY)
        try:
            size, head = os.fstat(fd).st_size, os.pread(fd, 3, 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"cannot read {p} ({e.strerror}); fix or remove it") from None
    if head != ilsvrc.SOI:
        raise UserError(
            f"{p} is not a JPEG (no FF D8 FF marker); the packer stores JPEGs only: convert "
            "or remove it"
        )
    return Member(p.name, p.parent.name, str(p), 0, size)


def _flat_labels(
    names: list[str], classes: list[str], devkit: Path | None, labels: Path | None, where: Path
) -> list[int]:
    if labels is not None:
        wnids = ilsvrc.list_labels(labels, names, classes)
    elif devkit is not None:
        wnids = ilsvrc.devkit_labels(devkit, names, classes)
    else:
        raise UserError(
            f"{where} holds validation images without class folders; pass their labels with "
            "--val-labels FILE (LOC_val_solution.csv or 'filename label' lines) or --devkit "
            f"{ilsvrc.DEVKIT}"
        )
    index = {c: i for i, c in enumerate(classes)}
    return [index[w] for w in wnids]


def _folder_source(src: Path, devkit: Path | None, labels: Path | None):
    from addertrain.data.folder import class_names, index_split, list_folder

    classes = class_names(src, "train")
    splits = {}
    for split in SPLITS:
        path = src / split
        if not path.exists():
            continue
        flat = path.is_dir() and list_folder(path, images=True).members
        if split == "val" and flat and not list_folder(path, images=False).members:
            names = sorted(flat)
            y = _flat_labels(names, classes, devkit, labels, path)
            members = [_file_member(str(path / n)) for n in names]
            splits[split] = _split(members, y, str(path))
        else:
            if split == "val" and (devkit or labels):
                given = "--val-labels" if labels else "--devkit"
                raise UserError(
                    f"{path} has class folders, which give its labels; leave out {given} "
                    "(it is for a flat validation folder)"
                )
            index = index_split(src, split, classes)
            members = [_file_member(f) for f in index.files]
            splits[split] = _split(members, index.labels, str(path), by_class=True)
    return classes, splits


def _raw_source(train: Path, val: Path | None, devkit: Path | None, labels: Path | None):
    members = sorted(ilsvrc.scan_train_tar(train), key=lambda m: (m.group, m.name))
    classes = sorted({m.group for m in members})
    if not classes:
        raise UserError(f"{train} holds no per-class tars; pass the {ilsvrc.TRAIN_TAR} download")
    index = {c: i for i, c in enumerate(classes)}
    splits = {"train": _split(members, [index[m.group] for m in members], str(train))}
    if val is not None:
        vm = ilsvrc.scan_val_tar(val)
        splits["val"] = _split(
            vm, _flat_labels([m.name for m in vm], classes, devkit, labels, val), str(val)
        )
    return classes, splits


def find_source(src: Path, devkit: Path | None, labels: Path | None):
    """(classes, {split: Split}, the source as the manifest records it) of ``src``: a folder
    with train/ (and val/), or a folder holding the ILSVRC2012 tars."""
    src = src.expanduser().resolve()
    if (src / ilsvrc.TRAIN_TAR).is_file():
        val = src / ilsvrc.VAL_TAR
        val = val if val.is_file() else None
        if devkit is None and labels is None:
            if (src / ilsvrc.DEVKIT).is_file():
                devkit = src / ilsvrc.DEVKIT
            elif (src / ilsvrc.KAGGLE).is_file():
                labels = src / ilsvrc.KAGGLE
        kind = "ilsvrc-tars"
        classes, splits = _raw_source(src / ilsvrc.TRAIN_TAR, val, devkit, labels)
    elif (src / "train").exists():
        kind = "folder"
        classes, splits = _folder_source(src, devkit, labels)
    else:
        raise UserError(
            f"{src} is neither a folder dataset (train/<class>/*.JPEG) nor a folder holding "
            f"{ilsvrc.TRAIN_TAR}; pass one of them as SRC"
        )
    source = {
        "kind": kind,
        "path": str(src),
        "devkit": str(devkit) if devkit else None,
        "val_labels": str(labels) if labels else None,
    }
    return classes, splits, source


# -- the plan ------------------------------------------------------------------------------


def _sample_bytes(size: int, label: int) -> int:
    return 2 * BLOCK + _padded(size) + _padded(len(str(label)))


def plan_shards(split: Split, shard_size: int, order: np.ndarray) -> list[np.ndarray]:
    """The rows (canonical indices) of each shard, in write order ``order``: a shard closes
    once it holds ``shard_size`` bytes or more."""
    shards, start, filled = [], 0, 0
    for i, row in enumerate(order.tolist()):
        m = split.members[row]
        filled += _sample_bytes(m.size, split.labels[row])
        if filled >= shard_size:
            shards.append(order[start : i + 1])
            start, filled = i + 1, 0
    if start < len(order):
        shards.append(order[start:])
    return shards


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _jobs(split: Split, rows: np.ndarray):
    """The (name, size, label, source path, offset) of each sample of a shard."""
    ms = split.members
    return [
        (split.keys[r], ms[r].size, split.labels[r], ms[r].path, ms[r].offset)
        for r in rows.tolist()
    ]


def _plan_digest(samples: list[tuple]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(("\t".join(map(str, s)) + "\n").encode())
    return h.hexdigest()


def write_shard(dst: str, name: str, samples: list[tuple]) -> tuple[int, str]:
    """Write shard ``name`` of ``samples`` (from :func:`_jobs`) and its DALI index into
    ``dst`` via temporary names; returns its (bytes, sha256)."""
    path, idx = Path(dst, name), Path(dst, index_name(name))
    tmp, idx_tmp = path.with_name(f".{name}.tmp"), idx.with_name(f".{idx.name}.tmp")
    h, pos, lines, fds = hashlib.sha256(), 0, [], {}
    try:
        with open(tmp, "wb") as out:

            def put(data: bytes) -> None:
                nonlocal pos
                out.write(data)
                h.update(data)
                pos += len(data)

            for key, size, label, source, offset in samples:
                fd = fds.get(source)
                if fd is None:
                    fd = fds[source] = os.open(source, os.O_RDONLY)
                data = os.pread(fd, size, offset)
                if len(data) != size or not data.startswith(ilsvrc.SOI):
                    raise UserError(
                        f"{source} changed while packing ({key}: {len(data)} of {size} bytes, "
                        "or no JPEG marker); let it be, then run the pack again"
                    )
                cls = str(label).encode()
                members = []
                for ext, body in (("jpg", data), ("cls", cls)):
                    put(_header(f"{key}.{ext}", len(body)))
                    members.append(f"{ext} {pos} {len(body)} {key}.{ext}")
                    put(body + b"\0" * (_padded(len(body)) - len(body)))
                lines.append(" ".join(members))
            put(b"\0" * (2 * BLOCK))
            out.flush()
            os.fsync(out.fileno())
        with open(idx_tmp, "w", encoding="ascii") as f:
            f.write(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(idx_tmp, idx)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(dst).free
            raise UserError(
                f"the disk holding {dst} is full writing {name} (this shard needs about "
                f"{pos + BLOCK} bytes, {free} are free); free space or choose another DST, then "
                "run the pack again (it resumes)"
            ) from None
        raise UserError(
            f"cannot write {path} ({e.strerror}); fix DST and run the pack again"
        ) from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return pos, h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _kept(dst: Path, name: str, digest: str) -> tuple[int, str] | None:
    """The (bytes, sha256) of shard ``name`` when an earlier run finished it from the same
    plan and it still matches its record; None when it must be written."""
    try:
        record = json.loads((dst / STATE / f"{name}.json").read_text())
        if record["plan"] != digest or os.stat(dst / name).st_size != record["bytes"]:
            return None
        if not (dst / index_name(name)).is_file() or _file_sha256(dst / name) != record["sha256"]:
            return None
        return record["bytes"], record["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def _prepare_dst(dst: Path, args: dict) -> None:
    """Create DST and its state; refuse a DST that holds another pack's state."""
    state = dst / STATE
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {dst} ({e.strerror}); choose a writable DST") from None
    path = state / "args.json"
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if before != args:
            raise UserError(
                f"{dst} holds a pack started with other arguments ({path}); run it again with "
                f"the same ones ({json.dumps(before)}) or choose an empty DST"
            )
    else:
        write_json_atomic(path, args)


def pack(
    src: Path,
    dst: Path,
    shard_size: int = GiB,
    seed: int = 0,
    workers: int = 1,
    devkit: Path | None = None,
    val_labels: Path | None = None,
    progress: bool = True,
) -> Path:
    """Pack ``src`` into ``dst``; returns the manifest's path."""
    if shard_size < 4 * BLOCK:
        raise UserError("--shard-size must be at least 2KiB")
    dst = dst.expanduser().resolve()
    classes, splits, source = find_source(src, devkit, val_labels)
    _prepare_dst(dst, {**source, "shard_size": shard_size, "seed": seed})
    plans = {}  # split -> [(name, rows, samples, digest)]
    for s, split in splits.items():
        canonical = np.arange(len(split.keys))
        order = np.random.default_rng(seed).permutation(canonical) if s == "train" else canonical
        plans[s] = []
        for k, rows in enumerate(plan_shards(split, shard_size, order)):
            samples = _jobs(split, rows)
            plans[s].append((shard_name(s, k), rows, samples, _plan_digest(samples)))
    done = {}
    todo = []
    for s in plans:
        for name, _rows, samples, digest in plans[s]:
            kept = _kept(dst, name, digest)
            if kept:
                done[name] = kept
            else:
                todo.append((name, samples, digest))
    if todo:  # shards change under their final names: the set is unfinished until the end
        (dst / MANIFEST).unlink(missing_ok=True)
    total = sum(len(p[1]) for s in plans for p in plans[s])
    line = ProgressLine("packed", total, "img", progress)
    count = total - sum(len(t[1]) for t in todo)

    def finished(name: str, samples: list, digest: str, result: tuple[int, str]) -> None:
        nonlocal count
        done[name] = result
        write_json_atomic(
            dst / STATE / f"{name}.json", {"plan": digest, "bytes": result[0], "sha256": result[1]}
        )
        count += len(samples)
        line.update(count)

    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo))) as pool:
            futures = {
                pool.submit(write_shard, str(dst), n, smp): (n, smp, d) for n, smp, d in todo
            }
            pending = set(futures)
            while pending:
                ready, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in ready:
                    if f.exception() is not None:
                        for p in pending:
                            p.cancel()
                        raise f.exception()
                    finished(*futures[f], f.result())
    else:
        for name, samples, digest in todo:
            finished(name, samples, digest, write_shard(str(dst), name, samples))
    line.update(count, final=True)
    infos = {}
    for s, split in splits.items():
        table = np.zeros(len(split.keys), SAMPLE_DTYPE)
        shards = []
        for k, (name, rows, samples, _) in enumerate(plans[s]):
            pos = np.cumsum([0] + [_sample_bytes(x[1], x[2]) for x in samples])
            table["shard"][rows] = k
            table["offset"][rows] = pos[:-1] + BLOCK
            table["size"][rows] = [x[1] for x in samples]
            table["label"][rows] = [x[2] for x in samples]
            shards.append(ShardInfo(name, done[name][0], done[name][1], len(rows)))
        _write_table(dst, s, table, split.keys)
        per_class = np.bincount(split.labels, minlength=len(classes)).tolist()
        infos[s] = SplitInfo(len(split.keys), per_class, shards)
    write_json_atomic(dst / MANIFEST, manifest_dict(classes, infos, source))
    _remove_stale(dst, {name for s in plans for name, *_ in plans[s]}, set(plans))
    return dst / MANIFEST


def _remove_stale(dst: Path, shards: set[str], splits: set[str]) -> None:
    """Delete what an earlier pack of a larger source left and the manifest no longer names:
    shards past the new count and their indexes and records, the tables of a dropped split.
    Only after the manifest is written, so a kill in between leaves a complete set."""
    for path in shard_files(dst):
        if path.name not in shards:
            for stale in (path, dst / index_name(path.name), dst / STATE / f"{path.name}.json"):
                stale.unlink(missing_ok=True)
    for split in set(SPLITS) - splits:
        table_path(dst, split).unlink(missing_ok=True)
        keys_path(dst, split).unlink(missing_ok=True)


def _write_table(dst: Path, split: str, table: np.ndarray, keys: list[str]) -> None:
    path, kpath = table_path(dst, split), keys_path(dst, split)
    tmp, ktmp = path.with_name(f".{path.name}.tmp"), kpath.with_name(f".{kpath.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, table, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        with open(ktmp, "w", encoding="utf-8") as f:
            f.write("\n".join(keys) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        os.replace(ktmp, kpath)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        ktmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write {path} ({e.strerror}); free space or fix DST, then run the pack again"
        ) from None


def pack_folder(src: Path, dst: Path, shard_size: int, seed: int = 0, workers: int = 1) -> Path:
    """Pack the folder dataset ``src`` into ``dst`` quietly (for tests and benchmarks)."""
    return pack(Path(src), Path(dst), shard_size, seed, workers, progress=False)


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise UserError(
            f"--shard-size {text!r} is not a size (e.g. 1GiB, 256MiB, 1000000)"
        ) from None


def add_arguments(p) -> None:
    p.description = (
        HELP + ". SRC is a folder dataset (train/<class>/*.JPEG; val/<class>/*.JPEG, or val/ "
        "holding the images directly with --val-labels or --devkit), or a folder holding "
        f"{ilsvrc.TRAIN_TAR} and {ilsvrc.VAL_TAR} (read in place, never unpacked; the labels "
        f"come from --devkit or --val-labels, or from {ilsvrc.DEVKIT} or {ilsvrc.KAGGLE} found "
        "next to the tars). Classes are the sorted class names (wnids). A killed pack run "
        "again with the same arguments resumes."
    )
    p.add_argument("src", help="folder dataset, or folder holding the ILSVRC2012 tars")
    p.add_argument("dst", help="output folder for the shards, sample tables and manifest.json")
    p.add_argument("--shard-size", default="1GiB", help="bytes per shard (default 1GiB)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the training samples' order")
    p.add_argument("--devkit", type=Path, help=f"{ilsvrc.DEVKIT}: validation labels")
    p.add_argument(
        "--val-labels",
        type=Path,
        help=f"{ilsvrc.KAGGLE}, or a text file of 'filename label' lines (label: a wnid or an "
        "index into the sorted wnids)",
    )


def run(args) -> int:
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    manifest = pack(
        Path(args.src),
        Path(args.dst),
        parse_size(args.shard_size),
        args.seed,
        args.workers,
        args.devkit,
        args.val_labels,
    )
    data = json.loads(manifest.read_text())
    for s, v in data["splits"].items():
        print(f"{s}: {v['samples']} samples in {len(v['shards'])} shards")
    print(f"packed {len(data['classes'])} classes into {manifest.parent}")
    return 0
