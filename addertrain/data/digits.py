"""``addertrain data digits DIR``: scikit-learn's handwritten digits as an ImageNet-format folder.

1,797 real 8x8 scans of handwritten digits (UCI), bundled with scikit-learn, so nothing is
downloaded. Each class is split 80/20 into train/val with a fixed seed, and each image is
upsampled to ``size`` x ``size`` (32 suits a CIFAR-style ResNet) and stored as an RGB JPEG.
"""

from __future__ import annotations

import json
from pathlib import Path

from addertrain.errors import UserError

HELP = "write scikit-learn's handwritten digits (1,797 real images, 10 classes) as a JPEG folder"

VAL_FRACTION = 0.2
SPLIT_SEED = 0
META = "digits.json"


def split_indices(targets, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED):
    """Stratified, seeded train/val indices: the same split on every machine."""
    import numpy as np

    train, val = [], []
    for c in np.unique(targets):
        members = np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(targets == c))
        n_val = round(len(members) * val_fraction)
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return sorted(train), sorted(val)


def _write(folder: Path, size: int) -> dict:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {}
    for split, indices in zip(("train", "val"), split_indices(digits.target)):
        for i in indices:
            label = int(digits.target[i])
            out = folder / split / str(label)
            out.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
            img = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC)
            img.convert("RGB").save(out / f"digit_{i:04d}.JPEG", quality=95)
        counts[split] = len(indices)
    return counts


def prepare_digits(root: str | Path, size: int = 32) -> Path:
    """Write the dataset to ``root`` unless it is already there; safe to call repeatedly.

    It is written to a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a half-written dataset at ``root``."""
    root = Path(root).expanduser()
    if size < 8:
        raise UserError(
            f"digits size {size} is below the 8x8 originals; use 8 or more (32 suits ResNet-20)"
        )
    if root.exists():
        meta = root / META
        if not meta.is_file():
            raise UserError(
                f"{root} exists but is not a digits dataset; choose another folder or remove it"
            )
        found = json.loads(meta.read_text()).get("size")
        if found != size:
            raise UserError(
                f"{root} holds digits at {found}x{found}, not {size}x{size}; remove it "
                f"or use data.image_size={found}"
            )
        return root
    from addertrain.data.folder import publish_folder

    def write(folder: Path) -> dict:
        return {
            "source": "sklearn.datasets.load_digits",
            "size": size,
            "val_fraction": VAL_FRACTION,
            "split_seed": SPLIT_SEED,
            **_write(folder, size),
        }

    return publish_folder(root, META, write, "the digits dataset")


def add_arguments(p) -> None:
    p.add_argument("dir", help="output folder (gets train/<digit>/*.JPEG and val/<digit>/*.JPEG)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")


def run(args) -> int:
    root = prepare_digits(args.dir, args.size)
    meta = json.loads((root / META).read_text())
    print(
        f"digits at {root}: {meta['train']} train + {meta['val']} val images, 10 classes, "
        f"{meta['size']}x{meta['size']} JPEG"
    )
    return 0
