"""``addertrain data check DIR``: find what would break or distort a multi-day run, before it
starts.

The full scan decodes every image (reduced-size JPEG decode, which still reads every byte)
and hashes it; :func:`quick_check` looks at the layout and the first bytes of each file,
cheaply enough to run at every training start.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from addertrain.data.folder import describe_oserror, first_few, list_folder, parse_file_list
from addertrain.errors import UserError

HELP = "scan a dataset for files and layouts that would break or distort training"

# kind -> (severity, what it means for a run). Errors make the dataset untrainable (exit 2).
KINDS = {
    "missing_split": ("error", "split folder or file list is missing"),
    "no_images": ("error", "split holds no images"),
    "empty_class": ("error", "training class folder without images: that class cannot be learned"),
    "unknown_val_class": (
        "error",
        "validation class absent from training: its label does not exist",
    ),
    "bad_entry": (
        "error",
        "folder named like an image, broken symlink or symlink loop: the loader refuses it",
    ),
    "bad_list_line": (
        "error",
        "file list line that is not 'relative/path label': the loader refuses it",
    ),
    "unreadable": ("error", "missing, empty, truncated or not an image: the decoder stops the run"),
    "missing_from_val": ("warning", "training class without validation images"),
    "not_jpeg": (
        "warning",
        "JPEG name but other content (e.g. PNG): GPU pipelines decode it on the CPU",
    ),
    "cmyk": ("warning", "CMYK JPEG: some decoders fail or distort colors"),
    "grayscale": ("warning", "grayscale JPEG: decoded to 3 identical channels"),
    "duplicate": ("warning", "same content in train and val: validation accuracy is inflated"),
    "ignored": ("warning", "not an image file (by name): the loader skips it"),
    "bad_array_file": (
        "error",
        "CIFAR or MNIST file that is damaged, foreign or refused: the loader stops the run",
    ),
}
# First bytes of the formats DALI's image decoders read. The loader takes *.jpeg, *.jpg and
# *.png by name; what matters to the decoder is the content.
SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",
    b"\xffO\xffQ",
)
HEAD = 16
# Files that launch opens with run.data_check=sample, spread evenly over the dataset.
SAMPLE = 10_000
SHOWN = 20  # files listed per problem on the terminal by default


def _split_members(root: Path, split: str, problems: dict) -> dict[str, list[str]] | None:
    """{class: [path relative to root]} of one split, or None when the split is missing."""
    path = root / split
    if path.is_file():
        entries, bad = parse_file_list(path)
        problems["bad_list_line"] += [f"{split}:{n}: {line!r}" for n, line in bad]
        members: dict[str, list[str]] = {}
        for name, label in entries:
            members.setdefault(str(label), []).append(os.path.relpath(path.parent / name, root))
        return members
    if not path.is_dir():
        problems["missing_split"].append(split)
        return None
    classes = list_folder(path, images=False)
    problems["bad_entry"] += [f"{split}/{b}" for b in classes.broken]
    members = {}
    for c in classes.members:
        listing = list_folder(path / c, images=True)
        members[c] = [f"{split}/{c}/{n}" for n in listing.members]
        problems["ignored"] += [f"{split}/{c}/{n}" for n in listing.ignored]
        problems["bad_entry"] += [f"{split}/{c}/{b}" for b in listing.broken]
    return members


def _by_class_name(members: dict, classes: list[str], split: str, problems: dict) -> dict:
    """A file list's {label: files} as {class name: files}: its labels index the training
    classes (e.g. a flat ILSVRC val/ with a `val.txt` of numeric labels beside a training
    split of wnid folders)."""
    named = {}
    for label, files in members.items():
        if int(label) < len(classes):
            named[classes[int(label)]] = files
        else:
            problems["unknown_val_class"].append(
                f"{split}: label {label} ({len(files)} files; training has {len(classes)} classes)"
            )
    return named


def layout(root: str | Path, train_split: str, val_split: str) -> tuple[dict, dict]:
    """The splits' members and the layout problems (everything but file contents)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"dataset folder {root} does not exist; pass the folder that holds "
            f"{train_split}/ and {val_split}/ (e.g. `addertrain data digits {root}` makes one)"
        )
    problems = {k: [] for k in KINDS}
    train = _split_members(root, train_split, problems)
    val = _split_members(root, val_split, problems)
    for split, members in ((train_split, train), (val_split, val)):
        if members is not None and not any(members.values()):
            problems["no_images"].append(split)
    if train is not None:
        problems["empty_class"] += [f"{train_split}/{c}" for c, files in train.items() if not files]
    if val is not None and (root / val_split).is_file() and (root / train_split).is_dir():
        val = _by_class_name(val, list(train), val_split, problems)
    if train is not None and val is not None:
        problems["unknown_val_class"] += [f"{val_split}/{c}" for c in val if c not in train]
        problems["missing_from_val"] += [
            f"{train_split}/{c}" for c, files in train.items() if files and not val.get(c)
        ]
    return {train_split: train or {}, val_split: val or {}}, problems


CHECK_CACHE = "dataset-check.json"


def _tree_key(root: Path, splits: dict, files: list[str]) -> str:
    """A digest of the listing and of the modification times of every folder holding a
    checked file (and of file-list splits): adding, removing or renaming an image changes its
    folder's mtime. An image rewritten in place under the same name does not; `addertrain
    data check` reads every byte."""
    h = hashlib.sha256(str(root).encode())
    for f in files:
        h.update(f"{f}\n".encode())
    folders = sorted({os.path.dirname(f) for f in files} | set(splits))
    for d in folders:
        try:
            h.update(f"{d}\t{os.stat(root / d).st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{d}\tmissing\n".encode())
    return h.hexdigest()


def _cache_hit(path: Path, key: str) -> bool:
    try:
        return json.loads(path.read_text()).get("tree") == key
    except (OSError, ValueError, AttributeError):
        return False


def _save_cache(path: Path, key: str) -> None:
    """Record a passed full check (reached only when no error was found)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps({"tree": key}) + "\n")
        os.replace(tmp, path)
    except OSError:  # a cache: the next launch checks again
        tmp.unlink(missing_ok=True)


def head_problem(head: bytes) -> str | None:
    """Why a file starting with ``head`` cannot be an image the decoder reads; None if it may be."""
    if not head:
        return "empty file"
    if not head.startswith(SIGNATURES):
        return f"not an image: starts with {head[:8].hex(' ')}"
    return None


def sniff(path: str) -> str | None:
    """Why ``path`` cannot be an image, from its first bytes: the cheap part of the full check
    (an open and a read of 16 bytes; it does not find truncation)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return describe_oserror(e)
    try:
        return head_problem(os.read(fd, HEAD))
    except OSError as e:
        return describe_oserror(e)
    finally:
        os.close(fd)


def sniff_all(root: Path, files: list[str], threads: int = 8) -> list[str]:
    """ "file (why)" of every file (relative to ``root``) that fails :func:`sniff`. Threads
    overlap the waits for a cold disk or a network file system (measured in docs/data.md)."""

    def bad(chunk: list[str]) -> list[str]:
        return [f"{f} ({why})" for f in chunk if (why := sniff(os.path.join(root, f)))]

    chunks = [files[i : i + 2048] for i in range(0, len(files), 2048)]
    with ThreadPoolExecutor(threads) as pool:
        return [found for chunk in pool.map(bad, chunks) for found in chunk]


def even_sample(files: list[str], n: int) -> list[str]:
    return files if len(files) <= n else [files[i * len(files) // n] for i in range(n)]


def quick_check(
    root: str | Path,
    train_split: str = "train",
    val_split: str = "val",
    read: tuple[str, ...] | None = None,
    sample: int | None = None,
) -> dict:
    """What launch runs before any worker starts: the layout, and the first bytes of every
    file of the splits in ``read`` (default: both) or of an even ``sample`` of them. Raises
    UserError naming the first problems when the dataset cannot be trained on."""
    root = Path(root).expanduser()
    return check_listed(root, *layout(root, train_split, val_split), read, sample)


def check_listed(
    root: Path,
    splits: dict,
    problems: dict,
    read: tuple[str, ...] | None = None,
    sample: int | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """:func:`quick_check` on the splits as :func:`layout` listed them, the training split
    first (the launch indexes the dataset from the same listing). ``cache_dir`` (the run
    directory): a full check (no ``sample``) that passed there before on the same tree is
    reused instead of opening every file again at each requeue."""
    train_split = next(iter(splits))
    files = [f for s in (read or splits) for group in splits[s].values() for f in group]
    checked = even_sample(files, sample) if sample else files
    key = _tree_key(root, splits, checked) if cache_dir is not None and not sample else None
    cached = Path(cache_dir) / CHECK_CACHE if key else None
    reused = bool(cached and _cache_hit(cached, key))
    if not reused:
        problems["unreadable"] += sniff_all(root, checked)
    errors = [
        f"{KINDS[k][1]}: {first_few(v, 3)}"
        for k, v in problems.items()
        if v and KINDS[k][0] == "error"
    ]
    if errors:
        raise UserError(
            f"dataset {root} cannot be trained on: "
            + "; ".join(errors)
            + f". Run `addertrain data check {root}` for a full report."
        )
    if cached:
        _save_cache(cached, key)
    return {
        "classes": len(splits[train_split]),
        "images": {s: sum(map(len, m.values())) for s, m in splits.items()},
        "checked": 0 if reused else len(checked),  # files opened now
        "warnings": {k: len(v) for k, v in problems.items() if v},
    }


def inspect_image(path: str) -> tuple[str, str | None, str | None, str | None]:
    """(sha1 of the bytes, format, mode, error) of one image file."""
    import hashlib
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return "", None, None, describe_oserror(e)
    digest = hashlib.sha1(data).hexdigest()
    if why := head_problem(data[:HEAD]):  # Pillow reads formats (GIF, ...) that DALI does not
        return digest, None, None, why
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format, img.mode
            img.draft(mode, (1, 1))  # JPEG: decode at 1/8 scale; truncation is still detected
            img.load()
    except UnidentifiedImageError:  # its message shows the BytesIO, not the file
        return digest, None, None, "Pillow cannot identify it as an image"
    except Exception as e:  # noqa: BLE001 - any decoder failure is the finding itself
        return digest, None, None, f"{type(e).__name__}: {e}"
    return digest, fmt, mode, None


def scan(
    root: str | Path, train_split: str = "train", val_split: str = "val", workers: int = 1
) -> dict:
    """The full report: layout problems plus every image decoded and hashed."""
    from concurrent.futures import ProcessPoolExecutor

    root = Path(root).expanduser()
    splits, problems = layout(root, train_split, val_split)
    files = [f for members in splits.values() for group in members.values() for f in group]
    paths = [str(root / f) for f in files]
    if workers > 1 and len(paths) > 256:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(inspect_image, paths, chunksize=64))
    else:
        results = [inspect_image(p) for p in paths]
    seen_in_train: dict[str, str] = {}
    for f, (digest, fmt, mode, error) in zip(files, results, strict=True):
        jpeg_name = f.lower().endswith((".jpeg", ".jpg"))
        if error:
            problems["unreadable"].append(f"{f} ({error})")
        elif jpeg_name and fmt != "JPEG":
            problems["not_jpeg"].append(f"{f} ({fmt})")
        elif mode == "CMYK":
            problems["cmyk"].append(f)
        elif jpeg_name and mode in ("L", "1"):
            problems["grayscale"].append(f)
        if digest and f.startswith(f"{train_split}/"):
            seen_in_train.setdefault(digest, f)
    for f, (digest, *_) in zip(files, results, strict=True):
        if f.startswith(f"{val_split}/") and digest in seen_in_train:
            problems["duplicate"].append(f"{f} == {seen_in_train[digest]}")
    return report(
        root,
        {s: {"classes": len(m), "images": sum(map(len, m.values()))} for s, m in splits.items()},
        problems,
    )


def report(root: Path, splits: dict, problems: dict) -> dict:
    """The report :func:`format_table` prints: the split sizes and the problems found."""
    found = [
        {"kind": k, "severity": KINDS[k][0], "meaning": KINDS[k][1], "count": len(v), "files": v}
        for k, v in problems.items()
        if v
    ]
    return {
        "root": str(root),
        "splits": splits,
        "problems": found,
        "errors": sum(p["count"] for p in found if p["severity"] == "error"),
        "warnings": sum(p["count"] for p in found if p["severity"] == "warning"),
    }


def array_source(root: str | Path) -> str | None:
    """ "cifar" or "mnist" when ``root`` holds CIFAR python batches or MNIST IDX files."""
    from addertrain.data import cifar, mnist

    root = Path(root).expanduser()
    if any((root / layout.meta).is_file() for layout in cifar.LAYOUTS):
        return "cifar"
    if any((root / f"{mnist.FILES['train'][0]}{gz}").is_file() for gz in ("", ".gz")):
        return "mnist"
    return None


def scan_arrays(root: str | Path, source: str) -> dict:
    """The report of :func:`scan` for a CIFAR or MNIST folder: each split parsed as the loader
    parses it (a refused or damaged file is an error naming it), and classes without images."""
    import numpy as np

    from addertrain.data import cifar, mnist

    problems = {k: [] for k in KINDS}
    splits = {}
    for split in ("train", "val"):
        try:
            images, labels, classes = (cifar if source == "cifar" else mnist).load(root, split)
        except UserError as e:
            problems["bad_array_file"].append(str(e))
            splits[split] = {"classes": 0, "images": 0}
            continue
        splits[split] = {
            "classes": len(classes),
            "images": len(images),
            "shape": "x".join(map(str, images.shape[1:])) + " uint8",
        }
        empty = [
            f"{split}/{classes[c]}"
            for c in np.flatnonzero(np.bincount(labels, minlength=len(classes)) == 0)
        ]
        problems["empty_class" if split == "train" else "missing_from_val"] += empty
    return report(Path(root).expanduser(), splits, problems)


def format_table(report: dict, shown: int = SHOWN) -> str:
    """The split sizes, then each problem with its files (the first ``shown``; 0: all)."""
    lines = [f"dataset {report['root']}"]
    for s, v in report["splits"].items():
        shape = f" of {v['shape']}" if v.get("shape") else ""
        lines.append(f"  {s:<10} {v['classes']:>6} classes {v['images']:>9} images{shape}")
    for p in report["problems"]:
        lines.append(f"{p['kind']} ({p['severity']}, {p['count']}): {p['meaning']}")
        listed = p["files"][:shown] if shown else p["files"]
        lines += [f"  {f}" for f in listed]
        if len(listed) < p["count"]:
            lines.append(
                f"  ... and {p['count'] - len(listed)} more (--show 0 or --json lists all)"
            )
    if not report["problems"]:
        lines.append("no problems found")
    verdict = "cannot be trained on" if report["errors"] else "can be trained on"
    lines.append(f"{report['errors']} errors, {report['warnings']} warnings: the dataset {verdict}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument(
        "dir",
        help="dataset folder holding the splits (train/<class>/*.JPEG, ...), "
        "or CIFAR python batches, or MNIST IDX files",
    )
    p.add_argument("--train-split", default="train", help="training split folder or file list")
    p.add_argument("--val-split", default="val", help="validation split folder or file list")
    p.add_argument("--json", metavar="PATH", help="also write the full report as JSON to PATH")
    p.add_argument(
        "--show",
        type=int,
        default=SHOWN,
        metavar="N",
        help=f"files listed per problem (default {SHOWN}; 0: all)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes decoding images (default: all cores)",
    )


def run(args) -> int:
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.show < 0:
        raise UserError("--show must be 0 (all) or a positive number of files")
    from addertrain.data import shards

    if shards.is_packed(args.dir):
        return _check_packed(args)
    source = array_source(args.dir)
    found = (
        scan_arrays(args.dir, source)
        if source
        else scan(args.dir, args.train_split, args.val_split, args.workers)
    )
    print(format_table(found, args.show))
    _write_json(args.json, found)
    return 2 if found["errors"] else 0


def _write_json(path: str | None, found: dict) -> None:
    if not path:
        return
    try:
        Path(path).write_text(json.dumps(found, indent=1) + "\n")
    except OSError as e:
        raise UserError(f"cannot write the report to {path}: {e.strerror}") from None
    print(f"report written to {path}")


def _check_packed(args) -> int:
    """A packed set: every shard's sha256 and one decoded sample per shard, one line per
    problem."""
    from addertrain.data import shards

    manifest = shards.load_manifest(args.dir)
    problems = shards.verify_shards(manifest, workers=args.workers)
    for s, info in manifest.splits.items():
        print(
            f"  {s:<10} {len(manifest.classes):>6} classes {info.samples:>9} samples "
            f"in {len(info.shards)} shards"
        )
    for p in problems:
        print(p)
    print(
        f"{len(problems)} problems: the packed dataset "
        + ("cannot be trained on" if problems else "can be trained on")
    )
    _write_json(
        args.json,
        {"root": str(manifest.root), "packed": True, "problems": problems, "errors": len(problems)},
    )
    return 2 if problems else 0
