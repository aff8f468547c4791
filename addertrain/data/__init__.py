"""Input pipelines.

A loader serves one worker. Iterating it yields ``(images, labels, valid)`` micro-batches
for one epoch: images float NCHW, normalized, on the worker's device; labels int64;
``valid`` the number of real samples at the front of the batch (evaluation pads the
last batches so every worker runs the same number of steps). It has ``steps_per_epoch``
(the same on every worker), ``set_epoch(epoch)``, and ``state_dict()`` /
``load_state_dict()`` for its position (exact mid-epoch resume).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from addertrain.config import Config


def build_loader(
    cfg: Config,
    split: str,
    batch: int,
    rank: int,
    world: int,
    device: torch.device,
    index_dir: Path | None = None,
):
    """The loader of ``split`` ("train" or "val") for worker ``rank`` of ``world``; a folder
    dataset comes from the index the launch wrote into ``index_dir``, when given."""
    training = split == "train"
    # micro-batches per optimizer step: training lays out the epoch per global batch
    group = cfg.train.global_batch // (batch * world) if training else 1
    d = cfg.data
    if d.source == "synthetic":
        from addertrain.data.synthetic import SyntheticLoader

        size = d.synthetic.train_size if training else d.synthetic.val_size
        return SyntheticLoader(
            cfg.model.num_classes,
            size,
            d.image_size,
            d.channels,
            batch,
            rank,
            world,
            device,
            cfg.run.seed,
            split,
            training,
        )
    if d.source in ("cifar", "mnist"):
        from addertrain.data.dali import build_array_loader

        return build_array_loader(
            d, split, batch, rank, world, device, cfg.run.seed, training, group
        )
    if d.source == "packed":
        from addertrain.data.dali import build_packed_loader

        return build_packed_loader(
            d, split, batch, rank, world, device, cfg.run.seed, training, group
        )
    from addertrain.data.dali import build_folder_loader

    return build_folder_loader(
        d, split, batch, rank, world, device, cfg.run.seed, training, index_dir, group
    )
