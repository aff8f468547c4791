"""``addertrain bench data DIR``: images/s of the data pipelines, side by side in one run.

1. Folder vs packed shards (``addertrain data pack``): read-only and decoded img/s and file
   opens per epoch, each at 0, 0.5 and 2 ms of latency added to every ``open`` by an
   LD_PRELOAD shim (``scripts/open_latency.c``, built here with the system C compiler),
   standing in for a network file system's metadata latency. Rates are of a loader's
   second epoch after its first batch (a long run's steady state: the first epoch opened
   the shards a loader keeps open, and each epoch's pipeline start is a constant that an
   ImageNet epoch hides), in a child process that carries the shim. Opens are counted in
   a second child under ``strace`` (whose tracing would slow the timed one), over the first
   epoch of a loader built just before, so the shards' opens are in it. Read-only is DALI's
   file reader or the packed source's ``os.pread`` with nothing downstream; decoded adds
   the training decode and augmentation graph.
   With a packed set as DIR, it is measured alone at scale instead: the launch check's
   time, the index memory of two worker processes at once, and the read rate.
2. Decoded + augmented images/s, DALI pipeline vs a PyTorch DataLoader: both sides do the
   same work on the same training split: decode, random resized crop, resize to the image
   size, random flip, normalize to float CHW, in batches. DALI runs ``--workers`` threads;
   the DataLoader runs ``--workers`` processes decoding with Pillow (the torchvision
   ImageFolder path, written here because torchvision does not import beside this torch
   build).

Only CPU pipelines are measured: DALI's GPU wheel is too large to carry to the lent GPU
machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from addertrain.errors import UserError

HELP = (
    "images/s and file opens of folder vs packed data under injected open latency, and DALI "
    "vs a Pillow DataLoader (table + JSON)"
)

SHIM = Path(__file__).resolve().parents[2] / "scripts" / "open_latency.c"
LATENCY_ENV = "ADDERTRAIN_OPEN_LATENCY_US"  # what the shim reads at every open
MARK = "/addertrain-bench-mark/"  # opened (and missing) around an epoch: strace log markers
LATENCIES_MS = (0.0, 0.5, 2.0)
SOURCES = ("folder", "packed")

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


def build_shim() -> Path | None:
    """The open-latency shim, compiled once per source version into the user's cache, or None
    without a C compiler or a source checkout."""
    cc = shutil.which("cc")
    if cc is None or not SHIM.is_file():
        return None
    source = SHIM.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "addertrain"
    lib = cache / f"open_latency-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not lib.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_name(f".{lib.name}.{os.getpid()}")
        subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SHIM), "-ldl"], check=True
        )
        os.replace(tmp, lib)
    return lib


def packed_copy(root: str, dst: Path, shard_bytes: int, workers: int) -> Path:
    """``dst`` holding ``root`` packed: reused if it already is a packed set, else packed now."""
    from addertrain.data.pack import pack_folder
    from addertrain.data.shards import is_packed

    if not is_packed(dst):
        pack_folder(root, dst, shard_bytes, workers=workers)
    return dst


def _epoch_indices(samples: int, batch: int, epoch: int):
    """One worker's training order of ``epoch`` (seed 0), as a loader reads it."""
    from addertrain.data import sharding

    order = sharding.epoch_order(samples, 0, epoch, True)
    return sharding.shard_layout(order, 1, batch, 0)[0]


def _loader(spec: dict, source: str):
    import torch

    from addertrain.config import DataConfig
    from addertrain.data.dali import FolderLoader, PackedLoader

    root = spec["root"] if source == "folder" else spec["packed"]
    cfg = DataConfig(
        source=source,
        root=root,
        train_split=spec["split"],
        image_size=spec["size"],
        crop_scale=SCALE,
        crop_ratio=RATIO,
        mean=MEAN,
        std=STD,
        threads=spec["threads"],
    )
    layout = (cfg, True, spec["batch"], 0, 1, torch.device("cpu"), 0)
    if source == "packed":
        return PackedLoader(root, spec["split"], *layout)
    return FolderLoader(_folder_index(root, spec["split"]), *layout)


@functools.cache
def _folder_index(root: str, split: str):
    """The split listed once, as the launch lists a folder for its workers."""
    from addertrain.data.folder import class_names, index_split

    return index_split(root, split, class_names(root, split))


def _steady(batches) -> dict:
    """img/s over ``batches`` (an epoch's (images, labels) pairs) after the first, which
    pays the pipeline's start: a per-epoch constant that a real epoch's size hides."""
    next(batches)
    start, images = time.perf_counter(), 0
    for _, labels in batches:
        images += len(labels)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "img_per_s": images / seconds}


def _read_batches(loader):
    """The second epoch's batches through the loader's reading stage alone (no decoding)."""
    import torch

    from addertrain.data.dali import PackedLoader, batch_source, build_pipeline, file_source

    indices = _epoch_indices(loader.fingerprint["samples"], loader.batch, 1)
    if isinstance(loader, PackedLoader):
        read = batch_source(loader.source(indices))
    else:
        index = loader.index
        read = file_source([index.files[i] for i in indices], [index.labels[i] for i in indices])
    pipe = build_pipeline(read, loader.cfg, True, loader.batch, torch.device("cpu"), 1, None, False)
    for _ in range(len(indices) // loader.batch):
        yield pipe.run()


def _decode_epoch(spec: dict, source: str, loader=None) -> tuple[int, int | None]:
    """One decoded epoch of ``loader`` (default a fresh one); returns (samples, shards it has
    open, or None for a folder)."""
    loader = loader or _loader(spec, source)
    samples = sum(len(labels) for _, labels, _ in loader)
    return samples, loader.reader.open_shards() if source == "packed" else None


def _measure_source(spec: dict, source: str) -> dict:
    """Read-only and decoded img/s of a loader in its second epoch, as a long run reads:
    the first opened what a loader keeps open (the shards) and warmed the page cache."""
    loader = _loader(spec, source)
    _decode_epoch(spec, source, loader)
    read = _steady(_read_batches(loader))
    return {"read": read, "decoded": _steady((x, y) for x, y, _ in loader)}


def _mark(name: str) -> None:
    try:
        os.close(os.open(MARK + name, os.O_RDONLY))
    except FileNotFoundError:
        pass


def child(spec: dict) -> dict:
    """What one child process measures (``spec["mode"]``): "time", every source at every
    latency (the shim in LD_PRELOAD reads the latency at each open), or "opens", one decoded
    epoch per source between strace markers (its loader built before: what a run builds once)."""
    for source in SOURCES:  # imports, DALI's plugins and the folder listing, before any timing
        _decode_epoch(spec, source)
    out: dict = {}
    for source in SOURCES:
        if spec["mode"] == "opens":
            loader = _loader(spec, source)
            _mark(f"{source}-start")
            samples, shards = _decode_epoch(spec, source, loader)
            _mark(f"{source}-end")
            out[source] = {"samples": samples, "shards_read": shards}
            continue
        for ms in spec["latencies_ms"]:
            os.environ[LATENCY_ENV] = str(round(ms * 1000))
            out.setdefault(source, {})[str(ms)] = _measure_source(spec, source)
            os.environ[LATENCY_ENV] = "0"
    return out


def _run_child(spec: dict, prefix: list[str], env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps({**spec, "out": str(out_path)}))
        subprocess.run(
            [*prefix, sys.executable, "-m", "addertrain.bench.data", str(spec_path)],
            env={**os.environ, **env},
            check=True,
        )
        return json.loads(out_path.read_text())


def count_opens(log: str, source: str, under: str) -> tuple[int, int]:
    """(opens of files under ``under``, all opens) in an ``strace -f`` log between
    ``source``'s markers; the others are DALI's, e.g. its codec plugins at each pipeline."""
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if MARK + f"{source}-start" in line)
    end = next(i for i, line in enumerate(lines) if MARK + f"{source}-end" in line)
    calls = [
        line
        for line in lines[start + 1 : end]
        if ("open(" in line or "openat(" in line) and "resumed>" not in line
    ]
    prefix = f'"{os.path.abspath(under)}/'
    return sum(prefix in line for line in calls), len(calls)


def compare_sources(spec: dict) -> dict:
    """Folder vs packed: img/s per latency (one child with the shim) and opens per epoch (one
    child under strace, when installed)."""
    shim = build_shim()
    latencies = spec["latencies_ms"] if shim else [0.0]
    env = {"LD_PRELOAD": str(shim), LATENCY_ENV: "0"} if shim else {}
    timed = _run_child({**spec, "mode": "time", "latencies_ms": latencies}, [], env)
    result = {
        "latencies_ms": latencies,
        "shim": str(shim) if shim else "no C compiler (cc) or scripts/: latency 0 only",
        "sources": timed,
    }
    if shutil.which("strace") is None:
        result["opens"] = "strace is not installed (apt-get install strace): opens not counted"
    else:
        result["opens"] = count_epoch_opens(spec)
    return result


def count_epoch_opens(spec: dict) -> dict:
    """{source: samples, shards read (packed), opens per epoch of the dataset's files and of
    any file}: one decoded epoch per source of a loader built just before, in a child process
    under ``strace -f``."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "strace.log"
        trace = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=open,openat", "-o", str(log)]
        counted = _run_child({**spec, "mode": "opens"}, trace, {})
        text = log.read_text()
    out = {}
    for source in SOURCES:
        data, every = count_opens(text, source, spec["root" if source == "folder" else "packed"])
        out[source] = {**counted[source], "opens_per_epoch": data, "all_opens_per_epoch": every}
    return out


def targets(c: dict) -> list[tuple[str, float | None, bool | None]]:
    """(target, measured value, met) for the issue's three targets; None where not measured."""
    src = c["sources"]

    def ratio(ms: float, kind: str) -> float | None:
        if str(ms) not in src["folder"]:
            return None
        return src["packed"][str(ms)][kind]["img_per_s"] / src["folder"][str(ms)][kind]["img_per_s"]

    read_2ms, decoded_0 = ratio(2.0, "read"), ratio(0.0, "decoded")
    opens = c["opens"] if isinstance(c["opens"], dict) else None
    packed = opens["packed"] if opens else None
    return [
        ("packed read >= 20x folder at 2 ms/open", read_2ms, read_2ms and read_2ms >= 20),
        ("packed decoded >= 0.9x folder at 0 ms", decoded_0, decoded_0 and decoded_0 >= 0.9),
        (
            "packed opens per epoch <= shards read",
            packed and packed["opens_per_epoch"],
            packed and packed["opens_per_epoch"] <= packed["shards_read"],
        ),
    ]


def bench(
    root: str,
    split: str,
    size: int,
    batch: int,
    workers: int,
    count: int,
    warmup: int,
    packed: Path,
    shard_bytes: int,
    latencies_ms: list[float],
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
    spec = {
        "root": str(root),
        "packed": str(packed_copy(root, packed, shard_bytes, workers)),
        "split": split,
        "size": size,
        "batch": batch,
        "threads": workers,
        "latencies_ms": latencies_ms,
    }
    compared = compare_sources(spec)
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
        "folder_vs_packed": compared,
        "targets": [{"target": t, "value": v, "met": m} for t, v, m in targets(compared)],
        "note": (
            "DALI's GPU pipeline is not measured: its wheel is too large for the lent GPU machine"
        ),
    }


def _index_memory(root: str, split: str, shard: int, shards: int, barrier, results) -> None:
    """Worker ``shard`` of ``shards`` on one node: memory before and after building a
    PackedLoader over ``split``, and after laying out an epoch as the loader does and reading
    the table rows of its samples (which touches every page of the table), taken while every
    worker holds its own (the table's pages are shared: PSS splits them)."""
    import psutil
    import torch

    from addertrain.config import DataConfig
    from addertrain.data.dali import PackedLoader

    me = psutil.Process()

    def memory() -> dict:
        m = me.memory_full_info()
        return {"rss": m.rss, "uss": m.uss, "pss": m.pss}

    before = memory()
    cfg = DataConfig(source="packed", root=root, train_split=split)
    loader = PackedLoader(root, split, cfg, True, 64, shard, shards, torch.device("cpu"), 0)
    built = memory()
    indices = loader.epoch_layout()[0]
    rows = sum(len(loader.table[indices[k : k + 64]]) for k in range(0, len(indices), 64))
    barrier.wait()
    held = memory()
    barrier.wait()  # until every worker has measured
    results.put({"before": before, "built": built, "epoch": held, "rows_read": rows})


def scale(root: str, split: str, size: int, batch: int, threads: int, count: int) -> dict:
    """A packed set alone, at scale: the launch check's time, the index memory per worker
    (two processes at once), and the read rate over ``count`` batches."""
    import multiprocessing
    from itertools import islice

    import torch

    from addertrain import config
    from addertrain.data.dali import PackedLoader, batch_source, build_pipeline
    from addertrain.data.prepare import check_packed
    from addertrain.data.shards import load_manifest

    manifest = load_manifest(root)
    cfg = config.from_dict(
        {
            "data": {"source": "packed", "root": str(root), "train_split": split},
            "model": {"num_classes": len(manifest.classes)},
        }
    )
    start = time.perf_counter()
    check_packed(cfg, training=True)
    check_s = time.perf_counter() - start
    ctx = multiprocessing.get_context("spawn")
    workers = 2
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_index_memory, args=(str(root), split, k, workers, barrier, results))
        for k in range(workers)
    ]
    for proc in procs:
        proc.start()
    memory = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    d = cfg.data.model_copy(update={"image_size": size, "threads": threads})
    loader = PackedLoader(root, split, d, True, batch, 0, 1, torch.device("cpu"), 0)
    indices = _epoch_indices(loader.fingerprint["samples"], batch, 0)[: (count + 1) * batch]
    pipe = build_pipeline(
        batch_source(loader.source(indices)), d, True, batch, torch.device("cpu"), 0, None, False
    )
    read = _steady(pipe.run() for _ in range(count + 1))
    decoded = _steady((x, y) for x, y, _ in islice(loader, count + 1))
    info = manifest.splits[split]
    return {
        "packed": str(root),
        "split": split,
        "samples": info.samples,
        "shards": len(info.shards),
        "bytes": sum(s.bytes for s in info.shards),
        "launch_check_s": check_s,
        "index_memory": memory,
        "image_size": size,
        "batch": batch,
        "threads": threads,
        "read": read,
        "decoded": decoded,
    }


def format_scale(r: dict) -> str:
    mib = 2**20
    lines = [
        f"{r['packed']}/{r['split']}: {r['samples']} samples in {r['shards']} shards "
        f"({r['bytes'] / 2**30:.2f} GiB)",
        f"  launch check (manifest + shard sizes): {r['launch_check_s']:.2f} s",
        "  index memory per worker, 2 workers at once (MiB over the process before the loader):",
        f"  {'':>6} {'RSS built':>10} {'RSS epoch':>10} {'USS epoch':>10} {'PSS epoch':>10}",
    ]
    for k, m in enumerate(r["index_memory"]):
        b = m["before"]
        lines.append(
            f"  {k:>6} {(m['built']['rss'] - b['rss']) / mib:>10.1f} "
            f"{(m['epoch']['rss'] - b['rss']) / mib:>10.1f} "
            f"{(m['epoch']['uss'] - b['uss']) / mib:>10.1f} "
            f"{(m['epoch']['pss'] - b['pss']) / mib:>10.1f}"
        )
    for kind in ("read", "decoded"):
        m = r[kind]
        lines.append(
            f"  {kind:<8} {m['images']} images at {r['image_size']}px, batch {r['batch']}, "
            f"{r['threads']} threads: {m['img_per_s']:.0f} img/s"
        )
    return "\n".join(lines)


def format_sources(r: dict) -> list[str]:
    c = r["folder_vs_packed"]
    lines = [
        "folder vs packed, img/s in a loader's second epoch after its first batch",
        f"  {'ms/open':>7} {'folder read':>12} {'packed read':>12} {'ratio':>7} "
        f"{'folder dec':>11} {'packed dec':>11} {'ratio':>7}",
    ]
    for ms in c["latencies_ms"]:
        f, p = c["sources"]["folder"][str(ms)], c["sources"]["packed"][str(ms)]
        row = [f"  {ms:>7.1f}"]
        for kind, width in (("read", 12), ("decoded", 11)):
            a, b = f[kind]["img_per_s"], p[kind]["img_per_s"]
            row.append(f"{a:>{width}.0f} {b:>{width}.0f} {b / a:>6.2f}x")
        lines.append(" ".join(row))
    if isinstance(c["opens"], dict):
        o = c["opens"]
        lines.append(
            f"  dataset files opened per epoch: folder {o['folder']['opens_per_epoch']} "
            f"({o['folder']['samples']} samples), packed {o['packed']['opens_per_epoch']} "
            f"({o['packed']['shards_read']} shards read); any file: folder "
            f"{o['folder']['all_opens_per_epoch']}, packed {o['packed']['all_opens_per_epoch']}"
        )
    else:
        lines.append(f"  opens per epoch: {c['opens']}")
    if len(c["latencies_ms"]) == 1:
        lines.append(f"  latency: {c['shim']}")
    for t in r["targets"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "" if t["value"] is None else f" ({t['value']:.4g})"
        lines.append(f"  target {t['target']}: {met}{value}")
    return lines


def format_table(r: dict) -> str:
    lines = [
        f"{r['dataset']}/{r['split']}: {r['images_in_split']} images -> {r['image_size']}px, "
        f"batch {r['batch']}, {r['workers']} workers (DALI threads, packed read threads), CPU",
        *format_sources(r),
        "DALI vs a Pillow DataLoader, decoded + augmented",
        f"  {'pipeline':<28} {'images':>8} {'seconds':>8} {'img/s':>9}",
    ]
    for key, name in (("dali", "DALI (CPU operators)"), ("torch", "DataLoader + Pillow")):
        m = r[key]
        lines.append(f"  {name:<28} {m['images']:>8} {m['seconds']:>8.2f} {m['img_per_s']:>9.1f}")
    lines.append(f"  ratio DALI / DataLoader: {r['ratio_dali_over_torch']:.2f}x")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument(
        "dir",
        help="dataset folder (ImageNet layout); or a packed set, measured alone at scale "
        "(launch check time, index memory per worker, read rate)",
    )
    p.add_argument("--split", default="train", help="split to read (default train)")
    p.add_argument(
        "--image-size", type=int, default=224, help="output side in pixels (default 224)"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DALI threads = packed read threads = DataLoader worker processes",
    )
    p.add_argument("--batches", type=int, default=20, help="batches timed, DALI vs DataLoader")
    p.add_argument("--warmup", type=int, default=3, help="batches run before timing")
    p.add_argument(
        "--packed",
        help="packed copy of DIR to compare (made there if absent; default: a temporary one)",
    )
    p.add_argument(
        "--shard-mib", type=float, default=1.0, help="shard size when packing (default 1 MiB)"
    )
    p.add_argument(
        "--latencies-ms",
        default=",".join(str(ms) for ms in LATENCIES_MS),
        help="latencies added to every open, comma-separated (default 0.0,0.5,2.0)",
    )
    p.add_argument("--json", default="bench_data.json", help="where to write the results")


def _latencies(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise UserError(f"--latencies-ms {text!r}: give milliseconds >= 0 separated by commas")
    return values if 0.0 in values else [0.0, *values]


def run(args) -> int:
    from addertrain.data.shards import is_packed

    if min(args.batch, args.workers, args.batches, args.image_size) < 1 or args.warmup < 0:
        raise UserError(
            "--batch, --workers, --batches and --image-size must be at least 1, --warmup at least 0"
        )
    if args.shard_mib <= 0:
        raise UserError("--shard-mib must be positive")
    if is_packed(args.dir):
        result = scale(
            args.dir, args.split, args.image_size, args.batch, args.workers, args.batches
        )
        table = format_scale(result)
    else:
        latencies = _latencies(args.latencies_ms)
        with tempfile.TemporaryDirectory() as tmp:
            result = bench(
                args.dir,
                args.split,
                args.image_size,
                args.batch,
                args.workers,
                args.batches,
                args.warmup,
                Path(args.packed) if args.packed else Path(tmp) / "packed",
                int(args.shard_mib * 2**20),
                latencies,
            )
        table = format_table(result)
    print(table)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":  # a measuring child of compare_sources
    _spec = json.loads(Path(sys.argv[1]).read_text())
    Path(_spec["out"]).write_text(json.dumps(child(_spec)))
