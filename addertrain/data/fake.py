"""``addertrain data fake DIR``: a tiny ImageNet-format folder of generated JPEGs, for tests.

Images come in various sizes and aspect ratios, some grayscale and some CMYK, so the
decoders see what real datasets hold. Class ``c`` is a noisy, tinted flat color whose
mean over pixels and channels (and whose gray level) is ``class_level(c, classes)``, so a
decoded image tells its class whatever its color mode or crop.
"""

from __future__ import annotations

from pathlib import Path

from addertrain.errors import UserError

HELP = "write a tiny ImageNet-format folder of generated JPEGs (sizes, aspect ratios, gray, CMYK)"

# A tint that moves neither the channel mean nor the luma (ITU-R 601) of a color.
_TINT = (30.0, -11.7, -18.3)
NOISE = 12


def class_level(c: int, classes: int) -> float:
    return 50.0 + 150.0 * c / max(1, classes - 1)


def class_folder(c: int) -> str:
    return f"c{c:03d}"


def image_mode(k: int) -> str:
    """The color mode of the k-th image written: a few grayscale and CMYK among RGB."""
    return {3: "L", 6: "CMYK"}.get(k % 8, "RGB")


def fake_image(level: float, sign: int, width: int, height: int, mode: str, rng):
    import numpy as np
    from PIL import Image

    color = np.array([level + sign * t for t in _TINT])
    noise = rng.integers(-NOISE, NOISE + 1, size=(height, width, 3))
    pixels = np.clip(np.round(color + noise), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def write_fake(
    root: str | Path,
    classes: int,
    per_class: int,
    val_per_class: int,
    seed: int = 0,
    sizes: tuple[int, int] = (24, 72),
) -> Path:
    import numpy as np

    root = Path(root)
    if classes < 1 or per_class < 1 or val_per_class < 0:
        raise UserError("--classes and --per-class must be at least 1, --val-per-class at least 0")
    if (root / "train").exists() or (root / "val").exists():
        raise UserError(f"{root} already holds a dataset; choose an empty or new folder")
    rng = np.random.default_rng(seed)
    k = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / class_folder(c)
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = rng.integers(sizes[0], sizes[1] + 1, size=2)
                img = fake_image(
                    class_level(c, classes), 1 if c % 2 else -1, int(w), int(h), image_mode(k), rng
                )
                img.save(folder / f"{split}_{c:03d}_{i:05d}.JPEG", quality=95)
                k += 1
    return root


def add_arguments(p) -> None:
    p.add_argument("dir", help="output folder (gets train/ and val/)")
    p.add_argument("--classes", type=int, default=4, help="number of classes (default 4)")
    p.add_argument(
        "--per-class", type=int, default=16, help="training images per class (default 16)"
    )
    p.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        help="validation images per class (default: a quarter of --per-class, at least 1)",
    )
    p.add_argument("--min-size", type=int, default=24, help="smallest image side (default 24)")
    p.add_argument("--max-size", type=int, default=72, help="largest image side (default 72)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    val = args.val_per_class if args.val_per_class is not None else max(1, args.per_class // 4)
    if not 8 <= args.min_size <= args.max_size:
        raise UserError("--min-size must be at least 8 and at most --max-size")
    root = write_fake(
        args.dir, args.classes, args.per_class, val, args.seed, (args.min_size, args.max_size)
    )
    print(f"wrote {args.classes} classes x ({args.per_class} train + {val} val) JPEGs to {root}")
    return 0
