"""The dataset before any worker starts: built if the recipe knows how, checked, and listed
once into the run directory for the workers."""

from __future__ import annotations

import os
import time
from pathlib import Path

from addertrain.config import Config
from addertrain.console import LOG
from addertrain.data.folder import SplitIndex
from addertrain.errors import UserError


def prepare_data(cfg: Config, training: bool = True) -> list[str] | None:
    """Build a missing dataset the recipe knows how to make, then check what the run will read
    (the layout, and the first bytes of the files: run.data_check) and, when training, that
    the run directory takes writes, so that bad input stops the run before any worker starts.
    When training, the listing the check made is also the workers' index of the dataset
    (``RUN_DIR/dataset-index.json.gz``). ``training`` False: the run only evaluates, and
    reads the validation split alone. Returns the class names (None for synthetic data)."""
    if training:
        from addertrain.storage import check_writable

        check_writable(cfg.run_dir())
    if cfg.data.source in ("cifar", "mnist"):
        from addertrain.data.dali import check_arrays

        classes, images = check_arrays(cfg.data, cfg.model.num_classes, training)
        if training:
            check_epoch_fits(cfg, images, full_batches_only=False)
        return classes
    if cfg.data.source == "packed":
        return check_packed(cfg, training)
    if cfg.data.source != "folder":
        if training:
            # SyntheticLoader drops a ragged tail: an epoch is size // global_batch steps
            check_epoch_fits(cfg, cfg.data.synthetic.train_size, full_batches_only=True)
        return None
    root = Path(cfg.data.root).expanduser()
    if cfg.data.prepare == "digits" and not root.exists():
        from addertrain.data.digits import prepare_digits

        LOG.info(f"preparing the digits dataset in {root}")
        prepare_digits(root, cfg.data.image_size)
    if cfg.data.prepare == "mnist5k" and not root.exists():
        from addertrain.data.mnist import prepare_mnist5k

        LOG.info(f"preparing the MNIST-5k dataset in {root}")
        prepare_mnist5k(root)
    from addertrain.data.check import SAMPLE, check_listed, layout

    d = cfg.data
    start = time.perf_counter()
    listed, problems = layout(root, d.train_split, d.val_split)
    found = check_listed(
        root,
        listed,
        problems,
        read=(d.train_split, d.val_split) if training else (d.val_split,),
        sample=SAMPLE if cfg.run.data_check == "sample" else None,
        # a requeue of the run does not open every file of an unchanged tree again
        cache_dir=cfg.run_dir() if training else None,
    )
    LOG.info(
        f"dataset {root}: {found['images'][d.train_split]} training and "
        f"{found['images'][d.val_split]} validation images; opened {found['checked']} in "
        f"{time.perf_counter() - start:.1f} s (run.data_check={cfg.run.data_check})"
    )
    if (root / d.train_split).is_file():
        from addertrain.data.folder import class_names

        classes = class_names(root, d.train_split)
    else:
        classes = list(listed[d.train_split])  # the class folders, sorted as the loader sorts
    if len(classes) != cfg.model.num_classes:
        raise UserError(
            f"{root / d.train_split} has {len(classes)} class folders but "
            f"model.num_classes is {cfg.model.num_classes}; set model.num_classes="
            f"{len(classes)} or point data.root at the intended dataset"
        )
    if training:
        check_epoch_fits(cfg, found["images"][d.train_split], full_batches_only=False)
        from addertrain.data.folder import write_index

        write_index(
            cfg.data.root,
            {
                split: _index(root, split, listed[split], classes)
                for split in (d.train_split, d.val_split)
            },
            cfg.run_dir(),
        )
    return classes


def check_packed(cfg: Config, training: bool) -> list[str]:
    """What launch checks of packed shards: the manifest (its format and classes) and that
    every shard the run reads is there at its recorded size. A stat per shard, never a read
    of a sample, so it takes seconds at ImageNet size and run.data_check does not apply
    (`addertrain data check` verifies the shards' sha256). Returns the class names."""
    from addertrain.data.shards import load_manifest, stat_shards

    d = cfg.data
    start = time.perf_counter()
    manifest = load_manifest(Path(d.root).expanduser())
    splits = (d.train_split, d.val_split) if training else (d.val_split,)
    for split in splits:
        if split not in manifest.splits:
            raise UserError(
                f"packed dataset {manifest.root} has no split {split!r} (it has "
                f"{', '.join(manifest.splits)}); set data.train_split/data.val_split to one of them"
            )
        stat_shards(manifest, split)
    if len(manifest.classes) != cfg.model.num_classes:
        raise UserError(
            f"packed dataset {manifest.root} has {len(manifest.classes)} classes but "
            f"model.num_classes is {cfg.model.num_classes}; set model.num_classes="
            f"{len(manifest.classes)} or point data.root at the intended dataset"
        )
    counts = ", ".join(f"{manifest.splits[s].samples} {s}" for s in splits)
    shards = sum(len(manifest.splits[s].shards) for s in splits)
    LOG.info(
        f"packed dataset {manifest.root}: {counts} samples in {shards} shards; manifest and "
        f"shard sizes checked in {time.perf_counter() - start:.2f} s"
    )
    if training:
        check_epoch_fits(cfg, manifest.splits[d.train_split].samples, full_batches_only=False)
    return manifest.classes


def _index(root: Path, split: str, members: dict[str, list[str]], classes: list[str]) -> SplitIndex:
    """The loader's index of a split from the check's listing ({class: [path under root]});
    a file list (root/split is a file) is the loader's own to read, in its line order."""
    if (root / split).is_file():
        from addertrain.data.folder import index_split

        return index_split(root, split, classes)
    top, files, labels = str(root), [], []
    for label, name in enumerate(classes):
        files += [os.path.join(top, f) for f in members.get(name, [])]  # 10x a Path join
        labels += [label] * len(members.get(name, []))
    return SplitIndex(files, labels, classes)


def check_epoch_fits(cfg: Config, images: int, full_batches_only: bool) -> None:
    """An epoch must hold at least one optimizer step of (at least partly) real micro-batches:
    the padded layout would otherwise train on copies. ``full_batches_only``: the loader drops
    a ragged tail instead of padding it."""
    from addertrain.data.sharding import steps_per_epoch

    workers = cfg.distributed.workers
    micro, accum = cfg.batch_split(workers)
    steps = (
        images // (micro * workers)
        if full_batches_only
        else steps_per_epoch(images, workers, micro)
    )
    if steps < accum:
        raise UserError(
            f"the training data has {images} images, less than one optimizer step of "
            f"train.global_batch={cfg.train.global_batch}; lower train.global_batch "
            f"to {images} or less, or use more data"
        )
