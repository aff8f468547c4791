"""ImageNet-format datasets on disk: ``root/<split>/<class>/<image>`` or a file list.

A split is either a folder of class folders or a text file (``root/<split>``) whose lines
read ``relative/path label``. Class indices come from the sorted class folder names of
the training split, so every split, worker and restart agrees on them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from addertrain.errors import UserError

# What the loader reads; anything else in a class folder is ignored (and reported by
# `addertrain data check`).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class SplitIndex:
    files: list[str]     # absolute paths, in a fixed order (class, then file name)
    labels: list[int]
    classes: list[str]   # class names in index order

    def digest(self) -> str:
        """A short hash of the file list and labels, to tell a changed dataset on resume."""
        h = hashlib.sha256()
        for f, y in zip(self.files, self.labels):
            h.update(f"{Path(f).name}\t{y}\n".encode())
        return h.hexdigest()[:16]


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders of a split (hidden folders are not classes)."""
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def image_names(class_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(class_dir) if e.is_file() and is_image(e.name))


def split_path(root: str | Path, split: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist; set data.root to a folder holding "
                        f"{split}/<class>/*.JPEG (e.g. `addertrain data digits {root}` makes one)")
    path = root / split
    if not path.exists():
        found = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        raise UserError(f"dataset {root} has no split {split!r} (found: {', '.join(found) or 'nothing'}); "
                        f"expected {path}/<class>/*.JPEG or a file list {path}")
    return path


def _read_file_list(path: Path) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.strip().rpartition(" ")
        if not name or not label.isdigit():
            raise UserError(f"{path}:{n}: expected 'relative/path label', got {line.strip()!r}")
        files.append(str((path.parent / name.strip()).resolve()))
        labels.append(int(label))
    if not files:
        raise UserError(f"file list {path} is empty; list one 'relative/path label' per line")
    return files, labels


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
            raise UserError(f"file list {path} uses labels {bad[:5]} but the training split has "
                            f"{len(classes)} classes")
        return SplitIndex(files, labels, classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [c for c in class_folders(path) if c not in index]
    if unknown:
        raise UserError(f"{path} has class folders missing from the training split: "
                        f"{', '.join(unknown[:5])}; remove them or add them to training")
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


def save_class_map(classes: list[str], run_dir: str | Path) -> Path:
    """Write ``classes.json`` ({class name: index}) into the run directory."""
    path = Path(run_dir) / "classes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: i for i, name in enumerate(classes)}, indent=1) + "\n")
    return path
