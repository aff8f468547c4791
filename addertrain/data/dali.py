"""DALI pipelines over one worker's shard of an ImageNet-format dataset (files, or samples of
packed shards read by offset, decoded by DALI) or of a dataset held as uint8 arrays (CIFAR,
MNIST: an external source).

One graph serves CUDA and CPU: on CUDA the decoder is "mixed" (nvJPEG) and the image
operators run on the worker's local GPU; elsewhere the pipeline has ``device_id=None``
and CPU operators. Each epoch gets its own pipeline over this worker's file list for
that epoch (see :mod:`addertrain.data.sharding`), so the order, the padding and the
augmentation seed are functions of (run seed, epoch) alone. Mid-epoch positions are
DALI pipeline checkpoints (reader or external-source position and random generator states).
"""

from __future__ import annotations

import base64
import hashlib
import weakref
from pathlib import Path

import numpy as np
import torch

from addertrain.config import DataConfig
from addertrain.data import sharding
from addertrain.data.folder import SplitIndex, class_names, index_split, read_index
from addertrain.errors import UserError

# Batches from the current one on that may be decoded when DALI reports an error: the
# pipeline runs ahead by its prefetch queue (2 by default) and the iterator by one more.
READ_AHEAD = 4


def default_eval_resize(image_size: int) -> int:
    # ImageNet practice (resize 256, crop 224); small images are evaluated whole.
    return image_size if image_size <= 64 else round(image_size * 256 / 224)


def dali_device_id(device: torch.device) -> int | None:
    """The pipeline's device: the local CUDA index (under Ray each worker sees its own
    CUDA_VISIBLE_DEVICES), or None for CPU operators."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def op_seeds(seed: int):
    """Seeds for a graph's random operators, in the order the graph creates them. DALI would
    otherwise seed each operator by its place among all operators, so a file reader and an
    external source in front of the same augmentation would draw different crops and flips."""
    return iter(np.random.SeedSequence(seed).generate_state(8) >> 1)


def pad_for_crop(images, size: int, pad: int, seeds):
    """``images`` zero-padded to (size + 2 pad) squared, and the random position of a size x
    size window in it: one of the (2 pad + 1)^2 pixel offsets, each equally likely
    (``seeds``: from :func:`op_seeds`)."""
    from nvidia.dali import fn

    images = fn.crop(
        images, crop=(size + 2 * pad, size + 2 * pad), fill_values=0, out_of_bounds_policy="pad"
    )
    # k / (2 pad) puts the window's corner exactly on pixel k of the padded image
    positions = [k / (2 * pad) for k in range(2 * pad + 1)]
    return (
        images,
        fn.random.uniform(values=positions, seed=next(seeds)),
        fn.random.uniform(values=positions, seed=next(seeds)),
    )


def flip_and_normalize(images, d: DataConfig, training: bool, crop, pos_x, pos_y, seeds):
    """The last step of every image pipeline: the crop window (if any), a random horizontal
    flip when training with ``data.flip``, ``data.mean``/``data.std``, CHW floats."""
    from nvidia.dali import fn, types

    # the used channels' statistics, on the 0-255 pixel scale
    mean, std = [255 * m for m in d.mean[: d.channels]], [255 * s for s in d.std[: d.channels]]
    mirror = fn.random.coin_flip(probability=0.5, seed=next(seeds)) if training and d.flip else 0
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        crop=crop,
        crop_pos_x=pos_x,
        crop_pos_y=pos_y,
        mean=mean,
        std=std,
        mirror=mirror,
    )


def file_source(files: list[str], labels: list[int]):
    """``read`` for :func:`build_pipeline`: DALI's file reader over ``files`` in list order."""

    def read():
        from nvidia.dali import fn

        return fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")

    return read


def batch_source(source):
    """``read`` for :func:`build_pipeline`: ``source(info)`` returns a batch's encoded images
    (uint8 arrays) and labels. It must be a function of ``info.iteration`` alone: DALI
    checkpoints a callable source as its iteration, and a restored pipeline asks again."""

    def read():
        from nvidia.dali import fn

        return fn.external_source(source, num_outputs=2, batch=True, batch_info=True)

    return read


def build_pipeline(
    read,
    d: DataConfig,
    training: bool,
    batch: int,
    device: torch.device,
    seed: int,
    checkpoint: bytes | None = None,
    decode: bool = True,
):
    """The decode and augmentation graph over encoded images from ``read()`` (a graph node
    pair: encoded images, labels; see :func:`file_source` and :func:`batch_source`), so a
    folder and packed shards decode alike. ``decode`` False: the graph returns the encoded
    bytes (what ``addertrain bench data`` times as reading alone)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    device_id = dali_device_id(device)
    if d.channels not in (1, 3):
        raise UserError(
            f"data.channels is {d.channels}; the image pipelines produce 1 (gray) or 3 (RGB)"
        )
    color = types.RGB if d.channels == 3 else types.GRAY
    size = d.image_size

    @pipeline_def(
        batch_size=batch,
        num_threads=d.threads,
        device_id=device_id,
        seed=seed,
        enable_checkpointing=True,
    )
    def graph():
        jpegs, label = read()
        if not decode:
            return jpegs, label
        seeds = op_seeds(seed)
        decoder = "mixed" if gpu else "cpu"
        crop, pos_x, pos_y = (size, size), 0.5, 0.5
        if training and d.random_resized_crop:
            images = fn.decoders.image_random_crop(
                jpegs,
                device=decoder,
                output_type=color,
                random_area=list(d.crop_scale),
                random_aspect_ratio=list(d.crop_ratio),
                num_attempts=10,
                seed=next(seeds),
            )
            images = fn.resize(images, resize_x=size, resize_y=size)
            crop = None
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=color)
            shorter = size if training else (d.eval_resize or default_eval_resize(size))
            images = fn.resize(images, resize_shorter=shorter)
            if training and d.pad_crop:
                images, pos_x, pos_y = pad_for_crop(images, size, d.pad_crop, seeds)
            elif training:
                pos_x = fn.random.uniform(range=(0, 1), seed=next(seeds))
                pos_y = fn.random.uniform(range=(0, 1), seed=next(seeds))
        return flip_and_normalize(images, d, training, crop, pos_x, pos_y, seeds), label

    return graph(checkpoint=checkpoint)


class ShardLoader:
    """One worker's batches of a split: ``(images, labels, valid)`` per step. A subclass
    says how a pipeline reads the samples at given indices (``_pipeline``)."""

    reader_name: str | None = "Reader"
    repair = "replace it with a readable image"  # what to do about an image DALI cannot decode

    def __init__(
        self,
        samples: int,
        digest: str,
        d: DataConfig,
        training: bool,
        batch: int,
        shard_id: int,
        num_shards: int,
        device: torch.device,
        seed: int,
        group: int = 1,
    ):
        self.cfg, self.training = d, training
        self.batch, self.shard_id, self.num_shards = batch, shard_id, num_shards
        self.device, self.seed, self.group = device, seed, group
        self.steps_per_epoch = sharding.steps_per_epoch(samples, num_shards, batch, group)
        self.fingerprint = {
            "samples": samples,
            "dataset": digest,
            "batch": batch,
            "shard": shard_id,
            "shards": num_shards,
        }
        self.epoch, self.step = 0, 0
        self._start = 0  # the step the current epoch's pipeline begins at (after a seek)
        self._restored: bytes | None = None  # checkpoint to resume the current epoch from
        self._iterator = None  # DALI iterator over the current epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first step; a no-op if it is the current epoch, so that
        a restored mid-epoch position survives the trainer's set_epoch call."""
        if epoch != self.epoch:
            self.epoch, self.step, self._start = epoch, 0, 0
            self._restored = self._iterator = None

    def seek(self, epoch: int, step: int) -> None:
        """Continue at ``step`` of ``epoch`` with a fresh pipeline (its augmentation draws are
        not those of a pipeline that ran from the epoch's start): how a resume on another
        number of workers continues, the sharding putting every optimizer step's samples at
        the same place of the order whatever the split (data/sharding.py)."""
        self.epoch, self.step, self._start = epoch, step, step
        self._restored = self._iterator = None

    def epoch_layout(self) -> tuple[np.ndarray, list[int]]:
        """This worker's sample indices for the current epoch and the valid count per step."""
        order = sharding.epoch_order(
            self.fingerprint["samples"], self.seed, self.epoch, self.training
        )
        indices, valid = sharding.shard_layout(
            order, self.num_shards, self.batch, self.shard_id, self.group
        )
        # held for the whole epoch: 4 bytes a sample instead of 8 (5 MB per 1.28 M)
        return indices.astype(np.uint32 if len(order) < 2**32 else np.int64), valid

    def _open(self):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        indices, self._valid = self.epoch_layout()
        seed = int(
            np.random.SeedSequence([self.seed, self.epoch, self.shard_id]).generate_state(1)[0] >> 1
        )
        checkpoint = self._restored if self.step else None
        pipe = self._pipeline(indices[self._start * self.batch :], seed, checkpoint)
        # The sample list is a whole number of batches, so no last-batch policy ever applies.
        return DALIGenericIterator(
            pipe,
            ["images", "labels"],
            reader_name=self.reader_name,
            last_batch_policy=LastBatchPolicy.FILL,
            auto_reset=False,
        )

    def _pipeline(self, indices: np.ndarray, seed: int, checkpoint: bytes | None):
        raise NotImplementedError

    def _broken_file(self) -> str | None:
        return None

    def _next_batch(self) -> dict:
        try:
            if self._iterator is None:
                self._iterator = self._open()
            return next(self._iterator)[0]
        except RuntimeError as e:
            # DALI's decode errors do not say which file failed ("nvImageCodec failure '#3'").
            broken = self._broken_file()
            if broken is None:
                e.add_note(
                    f"If an image is broken, `addertrain data check {self.cfg.root}` finds it."
                )
                raise
            raise UserError(
                f"the image decoder failed on {broken}; {self.repair} and resume with "
                f"--resume auto (`addertrain data check {self.cfg.root}` finds any others)"
            ) from None

    def __iter__(self):
        """The remaining steps of the current epoch; afterwards the loader is at the next epoch."""
        while self.step < self.steps_per_epoch:
            out = self._next_batch()
            valid = self._valid[self.step]
            self.step += 1
            labels = out["labels"].view(-1).to(self.device, torch.int64, non_blocking=True)
            yield out["images"], labels, valid
        self.epoch, self.step, self._start = self.epoch + 1, 0, 0
        self._restored = self._iterator = None

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "step": self.step, **self.fingerprint}
        if 0 < self.step < self.steps_per_epoch:
            cpt = self._iterator.checkpoints()[0] if self._iterator is not None else self._restored
            state["dali"] = base64.b64encode(cpt).decode()
            if self._start:  # the DALI checkpoint is of a pipeline that began there
                state["start"] = self._start
        return state

    def load_state_dict(self, state: dict) -> None:
        changed = {k: (state.get(k), v) for k, v in self.fingerprint.items() if state.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise UserError(
                f"the saved data position does not fit this run ({what}); resume with the "
                "same dataset, workers and batch size, or start a new run"
            )
        if 0 < state["step"] < self.steps_per_epoch and "dali" not in state:
            raise UserError(
                "the saved data position is mid-epoch but lacks its DALI checkpoint; "
                "the checkpoint is damaged, resume from another one"
            )
        self.epoch, self.step, self._start = state["epoch"], state["step"], state.get("start", 0)
        self._restored = base64.b64decode(state["dali"]) if "dali" in state else None
        self._iterator = None


class FolderLoader(ShardLoader):
    """An ImageNet-format folder (or file list), decoded by DALI's image decoder."""

    def __init__(self, index: SplitIndex, *layout, **kw):
        """``layout``: ShardLoader's arguments after ``samples`` and ``digest``."""
        super().__init__(len(index.files), index.digest(), *layout, **kw)
        self.index = index
        self._files: list[str] = []  # what the current epoch's pipeline reads, in order

    def _pipeline(self, indices, seed, checkpoint):
        self._files = [self.index.files[i] for i in indices]
        labels = [self.index.labels[i] for i in indices]
        return build_pipeline(
            file_source(self._files, labels),
            self.cfg,
            self.training,
            self.batch,
            self.device,
            seed,
            checkpoint,
        )

    def _broken_file(self) -> str | None:
        """ "path (why)" of the first file from the current batch on (as far as DALI reads
        ahead) that Pillow cannot decode either, or None."""
        from addertrain.data.check import inspect_image

        start = (self.step - self._start) * self.batch
        for path in self._files[start : start + READ_AHEAD * self.batch]:
            error = inspect_image(path)[3]
            if error:
                return f"{path} ({error})"
        return None


class PackedLoader(ShardLoader):
    """Packed shards (``data.source: packed``): the sample table memory-mapped (shared by the
    workers of a node through the page cache), the samples of each batch read by offset into
    an external source and decoded by the same graph as a folder's files."""

    reader_name = None  # the external source ends the epoch; the loader counts its steps
    repair = "repack the dataset from a source holding a readable copy"

    def __init__(self, root: str | Path, split: str, d: DataConfig, *layout, **kw):
        """``layout``: ShardLoader's arguments after ``d``."""
        from addertrain.data import shards
        from addertrain.data.packed import ShardReader, split_digest

        self.root, self.split = Path(root).expanduser(), split
        manifest = shards.load_manifest(self.root)
        if split not in manifest.splits:
            raise UserError(
                f"packed dataset {self.root} has no split {split!r} (it has "
                f"{', '.join(manifest.splits)}); set data.train_split/data.val_split to one of them"
            )
        info = manifest.splits[split]
        super().__init__(
            info.samples, split_digest(manifest.classes, info.shards), d, *layout, **kw
        )
        self.table = shards.sample_table(self.root, split)
        self.reader = ShardReader(self.root, [s.name for s in info.shards], d.threads)
        # the pipeline's source holds the reader too: close its files with the loader
        weakref.finalize(self, self.reader.close)
        self._indices = np.zeros(0, np.int64)  # the rows the current epoch's pipeline reads

    def source(self, indices: np.ndarray):
        """The external source's callable over the sample-table rows ``indices``, a batch per
        iteration (a function of the iteration alone: see batch_source)."""
        table, reader, batch = self.table, self.reader, self.batch
        steps = len(indices) // batch

        def source(info):
            if info.iteration >= steps:
                raise StopIteration
            rows = table[indices[info.iteration * batch : (info.iteration + 1) * batch]]
            return reader.read(rows), rows["label"].astype(np.int32)[:, None]

        return source

    def _pipeline(self, indices, seed, checkpoint):
        self._indices = indices
        return build_pipeline(
            batch_source(self.source(indices)),
            self.cfg,
            self.training,
            self.batch,
            self.device,
            seed,
            checkpoint,
        )

    def _broken_file(self) -> str | None:
        """ "shard member (why)" of the first sample from the current batch on (as far as DALI
        reads ahead) that Pillow cannot decode either, or None."""
        from addertrain.data.packed import sample_key
        from addertrain.data.shards import decode_problem

        start = (self.step - self._start) * self.batch
        for row in self._indices[start : start + READ_AHEAD * self.batch].tolist():
            sample = self.table[row]
            data = self.reader.read(self.table[row : row + 1])[0].tobytes()
            error = decode_problem(data)
            if error:
                shard = self.reader.names[int(sample["shard"])]
                key = sample_key(self.root, self.split, row)
                return f"{self.root / shard} member {key}.jpg ({error})"
        return None


def build_packed_loader(
    d: DataConfig,
    split: str,
    batch: int,
    shard_id: int,
    num_shards: int,
    device: torch.device,
    seed: int,
    training: bool,
    group: int = 1,
) -> PackedLoader:
    """The loader of ``split`` ("train" or "val") of the packed dataset at ``data.root``;
    ``seed`` as for :func:`build_folder_loader`."""
    name = d.train_split if split == "train" else d.val_split
    return PackedLoader(d.root, name, d, training, batch, shard_id, num_shards, device, seed, group)


def build_folder_loader(
    d: DataConfig,
    split: str,
    batch: int,
    shard_id: int,
    num_shards: int,
    device: torch.device,
    seed: int,
    training: bool,
    index_dir: Path | None = None,
    group: int = 1,
) -> FolderLoader:
    """The loader of ``split`` ("train" or "val") for worker ``shard_id`` of ``num_shards``,
    from the index the launch wrote into ``index_dir`` if it has one, else from a listing.

    ``seed`` is the run seed and must be the same on every worker: it fixes the epoch order
    that the shards partition."""
    name = d.train_split if split == "train" else d.val_split
    index = read_index(d.root, name, index_dir) if index_dir else None
    if index is None:
        index = index_split(d.root, name, class_names(d.root, d.train_split))
    return FolderLoader(index, d, training, batch, shard_id, num_shards, device, seed, group)


def build_array_pipeline(
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    d: DataConfig,
    training: bool,
    batch: int,
    device: torch.device,
    seed: int,
    checkpoint: bytes | None = None,
):
    """Decoded uint8 images (N x H x W x C) fed to DALI from memory: no file reading or
    decoding, so nothing is re-encoded. Images not image_size square are resized to it;
    training pads and crops (``data.pad_crop``) and flips (``data.flip``)."""
    from nvidia.dali import fn, pipeline_def

    gpu = device.type == "cuda"
    device_id = dali_device_id(device)
    size, pad = d.image_size, d.pad_crop if training else 0
    steps = len(indices) // batch

    def source(info):
        # A function of the iteration alone, which is what DALI checkpoints for a callable
        # source: a restored pipeline asks again from the saved iteration.
        if info.iteration >= steps:
            raise StopIteration
        rows = indices[info.iteration * batch : (info.iteration + 1) * batch]
        return images[rows], labels[rows].astype(np.int32)[:, None]

    @pipeline_def(
        batch_size=batch,
        num_threads=d.threads,
        device_id=device_id,
        seed=seed,
        enable_checkpointing=True,
    )
    def graph():
        image, label = fn.external_source(
            source, num_outputs=2, batch=True, batch_info=True, layout=["HWC", None]
        )
        if gpu:
            image = image.gpu()
        if images.shape[1:3] != (size, size):
            image = fn.resize(image, resize_x=size, resize_y=size)
        crop, pos_x, pos_y, seeds = None, 0.5, 0.5, op_seeds(seed)
        if pad:
            image, pos_x, pos_y = pad_for_crop(image, size, pad, seeds)
            crop = (size, size)
        return flip_and_normalize(image, d, training, crop, pos_x, pos_y, seeds), label

    return graph(checkpoint=checkpoint)


class ArrayLoader(ShardLoader):
    """A dataset held as uint8 arrays (CIFAR batches, MNIST IDX files) in each worker."""

    reader_name = None  # the external source ends the epoch; the loader counts its steps

    def __init__(self, images: np.ndarray, labels: np.ndarray, d: DataConfig, *layout, **kw):
        """``layout``: ShardLoader's arguments after ``d``."""
        if images.shape[3] != d.channels:
            raise UserError(
                f"data.channels is {d.channels} but the {d.source} images have "
                f"{images.shape[3]}; set data.channels={images.shape[3]}"
            )
        digest = hashlib.sha256(images.data)
        digest.update(labels.astype("<i8").tobytes())
        super().__init__(len(labels), digest.hexdigest()[:16], d, *layout, **kw)
        self.images, self.labels = images, labels

    def _pipeline(self, indices, seed, checkpoint):
        return build_array_pipeline(
            self.images,
            self.labels,
            indices,
            self.cfg,
            self.training,
            self.batch,
            self.device,
            seed,
            checkpoint,
        )


def load_arrays(d: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images N x H x W x C uint8, labels, class names) of an array source's split."""
    from addertrain.data import cifar, mnist

    return (cifar if d.source == "cifar" else mnist).load(d.root, split)


def build_array_loader(
    d: DataConfig,
    split: str,
    batch: int,
    shard_id: int,
    num_shards: int,
    device: torch.device,
    seed: int,
    training: bool,
    group: int = 1,
) -> ArrayLoader:
    images, labels, _ = load_arrays(d, split)
    return ArrayLoader(
        images, labels, d, training, batch, shard_id, num_shards, device, seed, group
    )


def check_arrays(d: DataConfig, num_classes: int, training: bool) -> tuple[list[str], int]:
    """What launch checks of an array source before any worker starts: the files parse, the
    classes and channels fit the recipe. Returns (class names, images of the split read)."""
    images, _, classes = load_arrays(d, "train" if training else "val")
    if len(classes) != num_classes:
        raise UserError(
            f"{d.root} holds {len(classes)} classes but model.num_classes is "
            f"{num_classes}; set model.num_classes={len(classes)}"
        )
    if images.shape[3] != d.channels:
        raise UserError(
            f"the {d.source} images have {images.shape[3]} channel(s) but "
            f"data.channels is {d.channels}; set data.channels={images.shape[3]}"
        )
    return classes, len(images)
