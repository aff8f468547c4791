"""CIFAR-10/100 from the python batches a user downloads (``cifar-10-batches-py/``,
``cifar-100-python/``), decoded to uint8 arrays for the DALI array pipeline.

The batches are pickles, and unpickling runs whatever code a file names. These files hold
only a dict of byte strings, lists of numbers or names and one uint8 array, so they are
read with an unpickler that rebuilds exactly those types and refuses every other global
with a message naming the file: a swapped-in file cannot run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from addertrain.errors import UserError

SIDE = 32
PIXELS = 3 * SIDE * SIDE


@dataclass(frozen=True)
class Layout:
    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    meta: str
    labels: str  # the label list's key in a batch
    names: str  # the class names' key in the meta file


LAYOUTS = (
    Layout(
        "CIFAR-10",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    Layout("CIFAR-100", ("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
)

# Rebuilding an ndarray takes numpy's _reconstruct (its module moved in numpy 2; the files
# name the old one), the ndarray class and dtype; nothing else is a global in these files.
_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"it names the Python object {module}.{name}, which a CIFAR batch never holds"
            )
        return found


def read_pickle(path: Path) -> dict:
    """The dict in one CIFAR pickle, keys as str; UserError for a damaged or foreign file."""
    try:
        with open(path, "rb") as f:
            data = _Unpickler(f, encoding="bytes").load()
    except OSError as e:
        raise UserError(f"cannot read CIFAR file {path}: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 - any failure of a foreign pickle is the finding
        raise UserError(
            f"CIFAR file {path} is not a CIFAR python batch ({e}); refused without "
            "running it. Download the python version again (cifar-10-python.tar.gz "
            "or cifar-100-python.tar.gz) and unpack it"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"CIFAR file {path} holds a {type(data).__name__}, not a batch dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in data.items()}


def find_layout(root: str | Path) -> Layout:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"CIFAR folder {root} does not exist; point data.root at the unpacked "
            "cifar-10-batches-py/ or cifar-100-python/"
        )
    for layout in LAYOUTS:
        if (root / layout.meta).is_file():
            missing = [f for f in layout.train + layout.val if not (root / f).is_file()]
            if missing:
                raise UserError(
                    f"{layout.name} folder {root} lacks {', '.join(missing)}; unpack "
                    "the whole archive there"
                )
            return layout
    raise UserError(
        f"{root} is not a CIFAR python folder: it has neither batches.meta "
        "(CIFAR-10) nor meta (CIFAR-100); point data.root at the unpacked "
        "cifar-10-batches-py/ or cifar-100-python/"
    )


def class_names(root: str | Path) -> list[str]:
    layout = find_layout(root)
    path = Path(root).expanduser() / layout.meta
    names = read_pickle(path).get(layout.names)
    if not isinstance(names, list) or not names:
        raise UserError(f"CIFAR meta file {path} has no {layout.names} list")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_batch(path: Path, key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = read_pickle(path)
    images, labels = batch.get("data"), batch.get(key)
    if not (
        isinstance(images, np.ndarray)
        and images.dtype == np.uint8
        and images.ndim == 2
        and images.shape[1] == PIXELS
    ):
        what = (
            f"{images.dtype} {images.shape}"
            if isinstance(images, np.ndarray)
            else type(images).__name__
        )
        raise UserError(
            f"CIFAR file {path}: 'data' must be a uint8 array of N x {PIXELS} "
            f"(32x32 RGB), found {what}"
        )
    if not isinstance(labels, list) or len(labels) != len(images):
        raise UserError(
            f"CIFAR file {path}: '{key}' must list one label per image "
            f"({len(images)}), found {type(labels).__name__}"
        )
    labels = np.asarray(labels)
    in_range = not len(labels) or 0 <= labels.min() <= labels.max() < classes
    if labels.dtype.kind not in "iu" or not in_range:
        raise UserError(f"CIFAR file {path}: labels must be integers in 0..{classes - 1}")
    # rows are planes: 1024 red, 1024 green, 1024 blue values, each row-major
    return images.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), labels.astype(np.int64)


def load(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images N x 32 x 32 x 3 uint8, labels int64, class names) of "train" or "val" (the
    test batch)."""
    root = Path(root).expanduser()
    layout = find_layout(root)
    classes = class_names(root)
    parts = [
        _read_batch(root / f, layout.labels, len(classes))
        for f in (layout.train if split == "train" else layout.val)
    ]
    return (
        np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
        np.concatenate([p[1] for p in parts]),
        classes,
    )
