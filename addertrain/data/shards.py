"""The packed dataset format (version 1) that ``addertrain data pack`` writes and
``data.source: packed`` reads.

A packed set ``DST`` holds, per split:

- ``{split}-{k:06d}.tar``: uncompressed POSIX tars, WebDataset-compatible: each sample is a
  ``<key>.jpg`` member (the original JPEG bytes) and a ``<key>.cls`` member (the label as
  ASCII decimal). Training samples are in a seeded shuffled order, validation in canonical
  order.
- ``{split}-{k:06d}.idx``: DALI's webdataset index of that tar (``wds2idx`` format v1.2).
- ``{split}.samples.npy``: the sample table, a numpy structured array of :data:`SAMPLE_DTYPE`
  rows in canonical order (sorted class, then sorted key: the order of the folder reader's
  index), whose ``offset``/``size`` locate each JPEG inside its shard, so every worker of a
  node shares one memory-mapped table instead of a per-sample Python index.
- ``{split}.keys.txt``: the sample keys, one per row of the table, for messages.

and ``manifest.json`` (classes, counts, every shard's size and sha256, the source), written
last and atomically: a manifest means the pack finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from addertrain.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLE_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("size", "<u4"), ("label", "<i4")])
IDX_VERSION = "v1.2"  # the index format DALI's wds2idx writes
JPEG_SOI = b"\xff\xd8\xff"
REPACK = "re-run `addertrain data pack` with the same arguments (it resumes, keeping good shards)"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    bytes: int
    sha256: str
    samples: int


@dataclass(frozen=True)
class SplitInfo:
    samples: int
    per_class: list[int]
    shards: list[ShardInfo]


@dataclass(frozen=True)
class Manifest:
    root: Path
    classes: list[str]
    splits: dict[str, SplitInfo]
    source: dict


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def shard_files(root: Path) -> list[Path]:
    """Every file under ``root`` named as :func:`shard_name` names shards."""
    return sorted(Path(root).glob("*-" + "[0-9]" * 6 + ".tar"))


def index_name(shard: str) -> str:
    """The DALI index file name of shard file name ``shard``."""
    return shard[: -len(".tar")] + ".idx"


def table_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}.samples.npy"


def keys_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}.keys.txt"


def is_packed(root: str | Path) -> bool:
    return (Path(root).expanduser() / MANIFEST).is_file()


def manifest_dict(classes: list[str], splits: dict[str, SplitInfo], source: dict) -> dict:
    """What ``manifest.json`` holds."""
    return {
        "format": FORMAT_VERSION,
        "classes": classes,
        "source": source,
        "splits": {
            s: {
                "samples": info.samples,
                "per_class": info.per_class,
                "shards": [vars(sh) for sh in info.shards],
            }
            for s, info in splits.items()
        },
    }


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``path`` via a fsynced temporary sibling and a rename: readers see the old file or
    the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parse_split(data: dict, classes: int) -> SplitInfo:
    shards = [
        ShardInfo(str(s["name"]), int(s["bytes"]), str(s["sha256"]), int(s["samples"]))
        for s in data["shards"]
    ]
    per_class = [int(n) for n in data["per_class"]]
    info = SplitInfo(int(data["samples"]), per_class, shards)
    if len(per_class) != classes or sum(per_class) != info.samples:
        raise ValueError("per_class does not match the classes or the sample count")
    if sum(s.samples for s in shards) != info.samples:
        raise ValueError("the shards' sample counts do not add up to the split's")
    return info


def load_manifest(root: str | Path) -> Manifest:
    """The manifest of the packed set at ``root``; UserError when it is missing, unreadable,
    malformed or from a newer format."""
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: {root} is not a finished packed dataset; pack it with "
            f"`addertrain data pack SRC {root}` (a killed pack resumes when run again)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); {REPACK}") from None
    version = data.get("format") if isinstance(data, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UserError(
            f"{path} is packed format {version}, newer than this addertrain reads "
            f"({FORMAT_VERSION}); upgrade addertrain or repack with this version"
        )
    try:
        if version != FORMAT_VERSION:
            raise ValueError(f"format {version!r} is not {FORMAT_VERSION}")
        classes = [str(c) for c in data["classes"]]
        splits = {str(s): _parse_split(v, len(classes)) for s, v in data["splits"].items()}
        source = dict(data.get("source") or {})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path} is malformed ({type(e).__name__}: {e}); {REPACK}") from None
    return Manifest(root, classes, splits, source)


def _split(manifest: Manifest, split: str) -> SplitInfo:
    if split not in manifest.splits:
        raise UserError(
            f"packed dataset {manifest.root} has no split {split!r} "
            f"(it has: {', '.join(manifest.splits) or 'none'}); pack one with "
            "`addertrain data pack`, or set data.train_split/data.val_split"
        )
    return manifest.splits[split]


def sample_table(root: str | Path, split: str, manifest: Manifest | None = None) -> np.ndarray:
    """The memory-mapped sample table of ``split`` (rows of :data:`SAMPLE_DTYPE` in canonical
    order); UserError when it is missing, damaged or does not match the manifest."""
    manifest = manifest or load_manifest(root)
    info = _split(manifest, split)
    path = table_path(manifest.root, split)
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the sample table {path} ({e}); {REPACK}") from None
    if table.dtype != SAMPLE_DTYPE or table.ndim != 1 or len(table) != info.samples:
        raise UserError(
            f"sample table {path} holds {table.shape} of {table.dtype}, not the manifest's "
            f"{info.samples} rows of {SAMPLE_DTYPE}; {REPACK}"
        )
    return table


def stat_shards(manifest: Manifest, split: str) -> None:
    """Check that every shard of ``split`` exists with the manifest's size (one ``stat`` each,
    no reads): what a launch affords at every start and requeue."""
    bad = []
    for s in _split(manifest, split).shards:
        path = manifest.root / s.name
        try:
            size = os.stat(path).st_size
        except OSError as e:
            bad.append(f"{path} ({e.strerror.lower() if e.strerror else e})")
            continue
        if size != s.bytes:
            bad.append(f"{path} ({size} bytes, manifest says {s.bytes})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserError(
            f"{len(bad)} shard(s) of split {split!r} are missing or have the wrong size: "
            f"{', '.join(bad[:3])}{more}; {REPACK}"
        )


class ProgressLine:
    """``what: done/total unit | rate | ETA`` on stderr, rewritten in place at most every
    ``interval`` seconds, and a final line."""

    def __init__(self, what: str, total: int, unit: str, enabled: bool = True, interval=1.0):
        self.what, self.total, self.unit, self.enabled = what, total, unit, enabled
        self.interval, self.start = interval, time.perf_counter()
        self.shown = self.start
        self.tty = sys.stderr.isatty()

    def update(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.shown < self.interval):
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = f"{self.what}: {done}/{self.total} {self.unit} | {rate:,.0f} {self.unit}/s | " + (
            f"took {_hms(now - self.start)}" if final else f"ETA {_hms(eta)}"
        )
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def decode_problem(data: bytes) -> str | None:
    """Why Pillow cannot decode ``data`` as a JPEG, or None."""
    import io

    from PIL import Image

    if not data.startswith(JPEG_SOI):
        return f"not a JPEG: starts with {data[:8].hex(' ')}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is the finding itself
        return f"{type(e).__name__}: {e}"
    return None


def _verify_one(path: str, expected: tuple[int, str], sample: tuple[int, int] | None) -> str | None:
    """Why shard ``path`` differs from its manifest record ``(bytes, sha256)``, or why its
    sample at ``(offset, size)`` does not decode; None when it is good."""
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                size += len(chunk)
            if sample is not None and size == expected[0]:
                f.seek(sample[0])
                data = f.read(sample[1])
    except OSError as e:
        return f"{path}: cannot read ({e.strerror or e}); {REPACK}"
    if size != expected[0]:
        return f"{path}: {size} bytes, manifest says {expected[0]} (truncated or altered); {REPACK}"
    if h.hexdigest() != expected[1]:
        return f"{path}: sha256 differs from the manifest (altered); {REPACK}"
    if sample is not None and (why := decode_problem(data)):
        return f"{path}: sample at byte {sample[0]} does not decode ({why}); {REPACK}"
    return None


def _table_problems(manifest: Manifest, split: str) -> tuple[list[str], np.ndarray | None]:
    """Problems of the sample table and keys of ``split`` as a whole (cheap, vectorized), and
    the table when it could be read."""
    info = manifest.splits[split]
    try:
        table = sample_table(manifest.root, split, manifest)
    except UserError as e:
        return [str(e)], None
    problems = []
    sizes = np.array([s.bytes for s in info.shards], dtype=np.uint64)
    counts = np.array([s.samples for s in info.shards])
    path = table_path(manifest.root, split)
    if len(table) and int(table["shard"].max()) >= len(info.shards):
        problems.append(f"{path}: rows point past the last shard; {REPACK}")
        return problems, None
    ends = table["offset"] + table["size"].astype(np.uint64)
    if len(table) and (ends > sizes[table["shard"]]).any():
        problems.append(f"{path}: rows point past the end of their shard; {REPACK}")
    if not np.array_equal(np.bincount(table["shard"], minlength=len(counts)), counts):
        problems.append(f"{path}: samples per shard differ from the manifest; {REPACK}")
    labels = table["label"]
    if len(table) and (labels.min() < 0 or labels.max() >= len(manifest.classes)):
        problems.append(f"{path}: labels outside the {len(manifest.classes)} classes; {REPACK}")
    elif not np.array_equal(np.bincount(labels, minlength=len(manifest.classes)), info.per_class):
        problems.append(f"{path}: samples per class differ from the manifest; {REPACK}")
    try:
        with open(keys_path(manifest.root, split), encoding="utf-8") as f:
            keys = sum(1 for _ in f)
        if keys != len(table):
            problems.append(
                f"{keys_path(manifest.root, split)}: {keys} keys for {len(table)} rows; {REPACK}"
            )
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{keys_path(manifest.root, split)}: cannot read ({e}); {REPACK}")
    for s in info.shards:
        idx = manifest.root / index_name(s.name)
        try:
            with open(idx, encoding="ascii") as f:
                head = f.readline().split()
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{idx}: cannot read ({e}); {REPACK}")
            continue
        if head != [IDX_VERSION, str(s.samples)]:
            problems.append(f"{idx}: header {' '.join(head)!r} does not match the shard; {REPACK}")
    return problems, table


def verify_shards(
    manifest: Manifest, splits: list[str] | None = None, workers: int = 1, progress: bool = True
) -> list[str]:
    """Every problem of the packed ``splits`` (default: all): the sample tables, keys and
    indexes checked against the manifest, then every shard's sha256 and one decoded sample per
    shard, in ``workers`` processes, with a progress line on stderr when ``progress``."""
    problems: list[str] = []
    jobs = []  # (path, (bytes, sha256), first sample)
    for split in splits or list(manifest.splits):
        info = _split(manifest, split)
        found, table = _table_problems(manifest, split)
        problems += found
        first = {}
        if table is not None and len(table):
            shard_ids, rows = np.unique(table["shard"], return_index=True)
            first = {
                int(k): (int(table["offset"][r]), int(table["size"][r]))
                for k, r in zip(shard_ids, rows)
            }
        for k, s in enumerate(info.shards):
            jobs.append((str(manifest.root / s.name), (s.bytes, s.sha256), first.get(k)))
    total = sum(j[1][0] for j in jobs)
    line = ProgressLine("verified", total >> 20, "MiB", progress)
    done = 0
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = pool.map(_verify_one, *zip(*jobs))
            for job, why in zip(jobs, results):
                done += job[1][0]
                line.update(done >> 20)
                problems += [why] if why else []
    else:
        for job in jobs:
            why = _verify_one(*job)
            done += job[1][0]
            line.update(done >> 20)
            problems += [why] if why else []
    line.update(done >> 20, final=True)
    return problems
