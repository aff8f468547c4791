"""ImageNet-format datasets on disk: ``root/<split>/<class>/<image>`` or a file list.

A split is either a folder of class folders or a text file (``root/<split>``) whose lines
read ``relative/path label``. Class indices come from the sorted class folder names of
the training split, so every split, worker and restart agrees on them.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from addertrain.errors import UserError

# What the loader reads; anything else in a class folder is ignored (and reported by
# `addertrain data check`).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class SplitIndex:
    files: list[str]  # absolute paths, in a fixed order (class, then file name)
    labels: list[int]
    classes: list[str]  # class names in index order

    def digest(self) -> str:
        """A short hash of the file list and labels, to tell a changed dataset on resume."""
        h = hashlib.sha256()
        for f, y in zip(self.files, self.labels):
            h.update(f"{Path(f).name}\t{y}\n".encode())
        return h.hexdigest()[:16]


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def first_few(items: list[str], n: int = 5) -> str:
    """The first ``n`` items and how many more, for one-line messages."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def describe_oserror(e: OSError) -> str:
    """Why a dataset entry cannot be read, in words."""
    return {
        errno.ELOOP: "symlink loop",
        errno.ENOENT: "missing or a broken symlink",
        errno.EISDIR: "a folder",
    }.get(e.errno, e.strerror or str(e))


@dataclass(frozen=True)
class Listing:
    """A folder's entries as the loader reads them; hidden entries are skipped."""

    members: list[str]  # the class folders of a split folder, or the images of a class folder
    ignored: list[str]  # anything else that the loader skips
    broken: list[str]  # "name (why)" of entries the loader refuses, e.g. a symlink loop


def _entry_kind(entry: os.DirEntry) -> str:
    """ "dir", "file", or why the entry is neither."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
        os.stat(entry.path)
        return "neither a file nor a folder"
    except OSError as e:
        return describe_oserror(e)


def list_folder(path: Path, images: bool) -> Listing:
    """The entries of a split folder (``images=False``: its members are class folders) or of a
    class folder (``images=True``: its members are image files).

    ``addertrain data check`` and the loader both read folders through this, so they agree
    on what is an image, what is skipped and what is refused."""
    members, ignored, broken = [], [], []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        kind = _entry_kind(entry)
        if kind not in ("dir", "file"):
            broken.append(f"{entry.name} ({kind})")
        elif images and kind == "dir" and is_image(entry.name):
            broken.append(f"{entry.name} (a folder named like an image)")
        elif (kind == "file" and is_image(entry.name)) if images else kind == "dir":
            members.append(entry.name)
        else:
            ignored.append(entry.name)
    return Listing(members, ignored, broken)


def _readable_members(path: Path, images: bool) -> list[str]:
    listing = list_folder(path, images)
    if listing.broken:
        raise UserError(
            f"{path} holds entries the loader cannot read: {first_few(listing.broken)}; "
            "fix or remove them (`addertrain data check` lists every problem)"
        )
    return listing.members


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders of a split (hidden folders are not classes)."""
    return _readable_members(split_dir, images=False)


def image_names(class_dir: Path) -> list[str]:
    return _readable_members(class_dir, images=True)


def split_path(root: str | Path, split: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"dataset folder {root} does not exist; set data.root to a folder holding "
            f"{split}/<class>/*.JPEG (e.g. `addertrain data digits {root}` makes one)"
        )
    path = root / split
    if path.is_symlink() and not path.exists():
        raise UserError(
            f"split {path} is a symlink that leads nowhere (broken, or a loop); point "
            "it at the split's folder or file list"
        )
    if not path.exists():
        found = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        raise UserError(
            f"dataset {root} has no split {split!r} (found: {', '.join(found) or 'nothing'}); "
            f"expected {path}/<class>/*.JPEG or a file list {path}"
        )
    return path


def parse_file_list(path: Path) -> tuple[list[tuple[str, int]], list[tuple[int, str]]]:
    """The (relative path, label) entries of a file list, and its malformed (line number,
    line) pairs. A line is a path (which may hold spaces), whitespace and a label."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"file list {path} is not UTF-8 text (byte offset {e.start}); write one "
            "'relative/path label' per line in UTF-8"
        ) from None
    entries, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.strip().rsplit(None, 1)
        if (
            len(fields) == 2 and fields[1].isdecimal()
        ):  # isdigit() also passes "²", which int() refuses
            entries.append((fields[0], int(fields[1])))
        elif fields:
            bad.append((n, line.strip()))
    return entries, bad


def _read_file_list(path: Path) -> tuple[list[str], list[int]]:
    entries, bad = parse_file_list(path)
    if bad:
        lines = [f"{path}:{n}: {line!r}" for n, line in bad]
        raise UserError(
            f"malformed file list lines, expected 'relative/path label': {first_few(lines, 3)}"
        )
    if not entries:
        raise UserError(f"file list {path} is empty; list one 'relative/path label' per line")
    # abspath, not resolve(): a symlink loop in the list must reach the checks, not raise here
    return [os.path.abspath(path.parent / name) for name, _ in entries], [y for _, y in entries]


def class_names(root: str | Path, train_split: str) -> list[str]:
    """The class names in index order, taken from the training split."""
    path = split_path(root, train_split)
    if path.is_file():
        return [str(i) for i in range(max(_read_file_list(path)[1]) + 1)]
    classes = class_folders(path)
    if not classes:
        raise UserError(f"{path} holds no class folders; expected {path}/<class>/*.JPEG")
    return classes


def index_split(root: str | Path, split: str, classes: list[str]) -> SplitIndex:
    """Every image of ``split`` with its label under the class list ``classes``."""
    path = split_path(root, split)
    if path.is_file():
        files, labels = _read_file_list(path)
        bad = sorted({y for y in labels if y >= len(classes)})
        if bad:
            raise UserError(
                f"file list {path} uses labels {bad[:5]} but the training split has "
                f"{len(classes)} classes"
            )
        return SplitIndex(files, labels, classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [c for c in class_folders(path) if c not in index]
    if unknown:
        raise UserError(
            f"{path} has class folders missing from the training split: "
            f"{', '.join(unknown[:5])}; remove them or add them to training"
        )
    files, labels = [], []
    for name in classes:
        folder = path / name
        if folder.is_dir():
            names = image_names(folder)
            files += [str(folder / f) for f in names]
            labels += [index[name]] * len(names)
    if not files:
        raise UserError(f"{path} holds no images (*.JPEG, *.jpg, *.png) in its class folders")
    return SplitIndex(files, labels, classes)


INDEX = "dataset-index.json.gz"


def write_index(root: str | Path, splits: dict[str, SplitIndex], run_dir: str | Path) -> Path:
    """Save the dataset as the launch driver listed it into ``run_dir``: every worker of the
    run, and of every restart, reads this instead of walking the (possibly shared,
    million-file) dataset itself. ``splits``: {split name: its index}, the training split first."""
    data = {
        "root": str(root),
        "classes": next(iter(splits.values())).classes,
        "splits": {s: dataclasses.asdict(index) for s, index in splits.items()},
    }
    path = Path(run_dir) / INDEX
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", compresslevel=1) as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return path


def read_index(root: str | Path, split: str, run_dir: str | Path) -> SplitIndex | None:
    """The split as the launch listed it, or None when ``run_dir`` has no index of this
    dataset (a run started before indexes, or another data.root)."""
    path = Path(run_dir) / INDEX
    if not path.is_file():
        return None
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    if data["root"] != str(root) or split not in data["splits"]:
        return None
    return SplitIndex(**data["splits"][split])


def save_class_map(classes: list[str], run_dir: str | Path) -> Path:
    """Write ``classes.json`` ({class name: index}) into the run directory."""
    path = Path(run_dir) / "classes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: i for i, name in enumerate(classes)}, indent=1) + "\n")
    return path


def publish_folder(root: Path, meta: str, write: Callable[[Path], dict], what: str) -> Path:
    """Make a generated dataset at ``root``: ``write(folder)`` fills a temporary sibling and
    returns the metadata saved as ``meta`` in it, then the sibling is renamed into place, so an
    interrupted run never leaves half a dataset."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        info = write(tmp)
        (tmp / meta).write_text(json.dumps(info, indent=1) + "\n")
        os.rename(tmp, root)
    except OSError as e:
        if not (root / meta).is_file():  # another process may have finished the same copy
            raise UserError(f"could not write {what} to {root}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
