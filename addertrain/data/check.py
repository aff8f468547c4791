"""``addertrain data check DIR``: find what would break or distort a multi-day run, before it starts.

The full scan decodes every image (reduced-size JPEG decode, which still reads every byte)
and hashes it; :func:`quick_check` only looks at the layout and counts, cheaply enough
to run at every training start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from addertrain.data.folder import class_folders, is_image
from addertrain.errors import UserError

HELP = "scan a dataset for files and layouts that would break or distort training (table + JSON)"

# kind -> (severity, what it means for a run). Errors make the dataset untrainable (exit 2).
KINDS = {
    "missing_split": ("error", "split folder or file list is missing"),
    "no_images": ("error", "split holds no images"),
    "empty_class": ("error", "training class folder without images: that class cannot be learned"),
    "unknown_val_class": ("error", "validation class absent from training: its label does not exist"),
    "unreadable": ("error", "unreadable or truncated image: the decoder stops the run"),
    "missing_from_val": ("warning", "training class without validation images"),
    "not_jpeg": ("warning", "JPEG name but other content (e.g. PNG): GPU pipelines decode it on the CPU"),
    "cmyk": ("warning", "CMYK JPEG: some decoders fail or distort colors"),
    "grayscale": ("warning", "grayscale JPEG: decoded to 3 identical channels"),
    "duplicate": ("warning", "same content in train and val: validation accuracy is inflated"),
    "ignored": ("warning", "not an image file (by name): the loader skips it"),
}


def _split_members(root: Path, split: str, problems: dict) -> dict[str, list[str]] | None:
    """{class: [path relative to root]} of one split, or None when the split is missing."""
    path = root / split
    if path.is_file():
        members: dict[str, list[str]] = {}
        for line in path.read_text().splitlines():
            name, _, label = line.strip().rpartition(" ")
            if name and label.isdigit():
                members.setdefault(label, []).append(os.path.relpath(path.parent / name, root))
        return members
    if not path.is_dir():
        problems["missing_split"].append(split)
        return None
    members = {}
    for c in class_folders(path):
        names = sorted(os.listdir(path / c))
        members[c] = [f"{split}/{c}/{n}" for n in names if is_image(n)]
        problems["ignored"] += [f"{split}/{c}/{n}" for n in names
                                if not is_image(n) and (path / c / n).is_file()]
    return members


def layout(root: str | Path, train_split: str, val_split: str) -> tuple[dict, dict]:
    """The splits' members and the layout problems (everything but file contents)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist; pass the folder that holds "
                        f"{train_split}/ and {val_split}/ (e.g. `addertrain data digits {root}` makes one)")
    problems = {k: [] for k in KINDS}
    train = _split_members(root, train_split, problems)
    val = _split_members(root, val_split, problems)
    for split, members in ((train_split, train), (val_split, val)):
        if members is not None and not any(members.values()):
            problems["no_images"].append(split)
    if train is not None:
        problems["empty_class"] += [f"{train_split}/{c}" for c, files in train.items() if not files]
    if train is not None and val is not None:
        problems["unknown_val_class"] += [f"{val_split}/{c}" for c in val if c not in train]
        problems["missing_from_val"] += [f"{train_split}/{c}" for c, files in train.items()
                                         if files and not val.get(c)]
    return {train_split: train or {}, val_split: val or {}}, problems


def quick_check(root: str | Path, train_split: str = "train", val_split: str = "val") -> dict:
    """Layout and counts only; raises UserError when the dataset cannot be trained on."""
    splits, problems = layout(root, train_split, val_split)
    errors = [f"{KINDS[k][1]}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
              for k, v in problems.items() if v and KINDS[k][0] == "error"]
    if errors:
        raise UserError(f"dataset {root} cannot be trained on: " + "; ".join(errors)
                        + f". Run `addertrain data check {root}` for a full report.")
    return {"classes": len(splits[train_split]),
            "images": {s: sum(map(len, m.values())) for s, m in splits.items()},
            "warnings": {k: len(v) for k, v in problems.items() if v}}


def inspect_image(path: str) -> tuple[str, str | None, str | None, str | None]:
    """(sha1 of the bytes, format, mode, error) of one image file."""
    import hashlib
    import io

    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return "", None, None, str(e)
    digest = hashlib.sha1(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format, img.mode
            img.draft(mode, (1, 1))  # JPEG: decode at 1/8 scale; truncation is still detected
            img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is the finding itself
        return digest, None, None, f"{type(e).__name__}: {e}"
    return digest, fmt, mode, None


def scan(root: str | Path, train_split: str = "train", val_split: str = "val",
         workers: int = 1) -> dict:
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
    for f, (digest, fmt, mode, error) in zip(files, results):
        jpeg_name = f.lower().endswith((".jpeg", ".jpg"))
        if error:
            problems["unreadable"].append(f"{f} ({error})")
        elif jpeg_name and fmt != "JPEG":
            problems["not_jpeg"].append(f"{f} ({fmt})")
        elif mode == "CMYK":
            problems["cmyk"].append(f)
        elif mode in ("L", "1"):
            problems["grayscale"].append(f)
        if digest and f.startswith(f"{train_split}/"):
            seen_in_train.setdefault(digest, f)
    for f, (digest, *_) in zip(files, results):
        if f.startswith(f"{val_split}/") and digest in seen_in_train:
            problems["duplicate"].append(f"{f} == {seen_in_train[digest]}")
    found = [{"kind": k, "severity": KINDS[k][0], "meaning": KINDS[k][1], "count": len(v),
              "files": v} for k, v in problems.items() if v]
    return {
        "root": str(root),
        "splits": {s: {"classes": len(m), "images": sum(map(len, m.values()))} for s, m in splits.items()},
        "problems": found,
        "errors": sum(p["count"] for p in found if p["severity"] == "error"),
        "warnings": sum(p["count"] for p in found if p["severity"] == "warning"),
    }


def format_table(report: dict) -> str:
    lines = [f"dataset {report['root']}"]
    for s, v in report["splits"].items():
        lines.append(f"  {s:<10} {v['classes']:>6} classes {v['images']:>9} images")
    rows = [("problem", "severity", "count", "example")]
    rows += [(p["kind"], p["severity"], str(p["count"]), p["files"][0]) for p in report["problems"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    if not report["problems"]:
        lines.append("  no problems found")
    verdict = "cannot be trained on" if report["errors"] else "can be trained on"
    lines.append(f"{report['errors']} errors, {report['warnings']} warnings: the dataset {verdict}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("dir", help="dataset folder holding the splits (train/<class>/*.JPEG, ...)")
    p.add_argument("--train-split", default="train", help="training split folder or file list")
    p.add_argument("--val-split", default="val", help="validation split folder or file list")
    p.add_argument("--json", default="data_check.json", help="where to write the JSON report")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes decoding images (default: all cores)")


def run(args) -> int:
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    report = scan(args.dir, args.train_split, args.val_split, args.workers)
    print(format_table(report))
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"report written to {args.json}")
    return 2 if report["errors"] else 0
