"""``addertrain bench data DIR``: decoded + augmented images/s, DALI pipeline vs a PyTorch
DataLoader.

Both sides do the same work on the same training split: decode, random resized crop,
resize to the image size, random flip, normalize to float CHW, in batches. DALI runs
``--workers`` threads; the DataLoader runs ``--workers`` processes decoding with Pillow
(the torchvision ImageFolder path, written here because torchvision does not import
beside this torch build). Only the CPU pipeline is measured: DALI's GPU wheel is too large
to carry to the lent GPU machine.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from addertrain.errors import UserError

HELP = "decoded+augmented images/s of the DALI CPU pipeline vs a Pillow DataLoader (table + JSON)"

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def random_resized_crop_box(width: int, height: int, rng) -> tuple[int, int, int, int]:
    """A crop box of random area fraction and aspect ratio (10 tries, then a center crop)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            return x, y, x + w, y + h
    w, h = width, height
    if width / height < RATIO[0]:
        h = round(width / RATIO[0])
    elif width / height > RATIO[1]:
        w = round(height * RATIO[1])
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


class PillowFolder:
    """The training split as a map-style dataset: Pillow decode and augmentation per sample."""

    def __init__(self, files: list[str], labels: list[int], size: int):
        self.files, self.labels, self.size = files, labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import random

        import numpy as np
        import torch
        from PIL import Image

        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
        img = img.resize(
            (self.size, self.size),
            Image.Resampling.BILINEAR,
            box=random_resized_crop_box(*img.size, random),
        )
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        return x, self.labels[i]


def _measure(batches, count: int, warmup: int, batch: int) -> dict:
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    seconds = time.perf_counter() - start
    return {"images": count * batch, "seconds": seconds, "img_per_s": count * batch / seconds}


def _forever(loader):
    while True:
        yield from loader


def bench(
    root: str, split: str, size: int, batch: int, workers: int, count: int, warmup: int
) -> dict:
    import torch

    from addertrain.config import DataConfig
    from addertrain.data.dali import FolderLoader
    from addertrain.data.folder import class_names, index_split

    index = index_split(root, split, class_names(root, split))
    if len(index.files) < batch:
        raise UserError(
            f"{root}/{split} has {len(index.files)} images, fewer than one batch of {batch}; "
            "lower --batch or use a bigger dataset"
        )
    cfg = DataConfig(
        source="folder",
        root=str(root),
        train_split=split,
        image_size=size,
        crop_scale=SCALE,
        crop_ratio=RATIO,
        mean=MEAN,
        std=STD,
        threads=workers,
    )
    dali = FolderLoader(index, cfg, True, batch, 0, 1, torch.device("cpu"), seed=0)
    results = {"dali": _measure(_forever(dali), count, warmup, batch)}
    del dali
    loader = torch.utils.data.DataLoader(
        PillowFolder(index.files, index.labels, size),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    results["torch"] = _measure(_forever(loader), count, warmup, batch)
    return {
        "dataset": str(root),
        "split": split,
        "images_in_split": len(index.files),
        "image_size": size,
        "batch": batch,
        "workers": workers,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        **results,
        "ratio_dali_over_torch": results["dali"]["img_per_s"] / results["torch"]["img_per_s"],
        "note": (
            "DALI's GPU pipeline is not measured: its wheel is too large for the lent GPU machine"
        ),
    }


def format_table(r: dict) -> str:
    lines = [
        f"{r['dataset']}/{r['split']}: {r['images_in_split']} images -> {r['image_size']}px, "
        f"batch {r['batch']}, {r['workers']} workers, CPU",
        f"  {'pipeline':<28} {'images':>8} {'seconds':>8} {'img/s':>9}",
    ]
    for key, name in (("dali", "DALI (CPU operators)"), ("torch", "DataLoader + Pillow")):
        m = r[key]
        lines.append(f"  {name:<28} {m['images']:>8} {m['seconds']:>8.2f} {m['img_per_s']:>9.1f}")
    lines.append(f"  ratio DALI / DataLoader: {r['ratio_dali_over_torch']:.2f}x")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("dir", help="dataset folder (ImageNet layout)")
    p.add_argument("--split", default="train", help="split to read (default train)")
    p.add_argument(
        "--image-size", type=int, default=224, help="output side in pixels (default 224)"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--workers", type=int, default=2, help="DALI threads = DataLoader worker processes"
    )
    p.add_argument("--batches", type=int, default=20, help="batches timed per pipeline")
    p.add_argument("--warmup", type=int, default=3, help="batches run before timing")
    p.add_argument("--json", default="bench_data.json", help="where to write the results")


def run(args) -> int:
    if min(args.batch, args.workers, args.batches, args.image_size) < 1 or args.warmup < 0:
        raise UserError(
            "--batch, --workers, --batches and --image-size must be at least 1, --warmup at least 0"
        )
    result = bench(
        args.dir, args.split, args.image_size, args.batch, args.workers, args.batches, args.warmup
    )
    print(format_table(result))
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {args.json}")
    return 0
