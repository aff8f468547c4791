"""A deterministic synthetic source: learnable, class-dependent images generated on the device.

Sample ``i`` of a split is a fixed per-class pattern plus noise seeded by ``(seed, split, i)``,
so every worker, restart and world size sees the same data. Used by smoke tests and
benchmarks (no host-to-device copy in the measured loop) and when no dataset is at hand.
"""

from __future__ import annotations

import torch

from addertrain.errors import UserError

_SPLIT_SEED = {"train": 1, "val": 2}


class SyntheticLoader:
    def __init__(
        self,
        num_classes: int,
        size: int,
        image_size: int,
        channels: int,
        batch: int,
        shard_id: int,
        num_shards: int,
        device: torch.device,
        seed: int,
        split: str,
        training: bool,
    ):
        self.num_classes, self.size, self.batch = num_classes, size, batch
        self.shard_id, self.num_shards, self.device = shard_id, num_shards, device
        self.seed, self.training = seed, training
        self.split_seed = seed * 1000 + _SPLIT_SEED[split]
        self.shape = (channels, image_size, image_size)
        g = torch.Generator().manual_seed(seed)
        # Low-frequency class patterns so that small convnets separate them quickly.
        coarse = torch.randn(num_classes, channels, 4, 4, generator=g)
        self.patterns = torch.nn.functional.interpolate(
            coarse, size=(image_size, image_size), mode="bilinear", align_corners=False
        ).to(device)
        # Training drops the ragged tail; evaluation pads it and masks the padding out.
        global_batch = batch * num_shards
        self.steps_per_epoch = size // global_batch if training else -(-size // global_batch)
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{size} synthetic samples give no full batch of {global_batch}; raise "
                f"data.synthetic.{split}_size to at least {global_batch}"
            )
        self.epoch, self.step = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    def _order(self) -> torch.Tensor:
        if not self.training:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(self.split_seed * 100003 + self.epoch)
        return torch.randperm(self.size, generator=g)

    def _sample(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self.split_seed * 7919 + index)
        noise = torch.randn(self.shape, generator=g)
        return noise.to(self.device) * 0.8 + self.patterns[label], label

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        order = self._order()
        while self.step < self.steps_per_epoch:
            start = (self.step * self.num_shards + self.shard_id) * self.batch
            idx = order[start : start + self.batch].tolist()
            valid = len(idx)
            idx += [idx[-1] if idx else 0] * (self.batch - valid)
            images, labels = zip(*(self._sample(i) for i in idx))
            labels = torch.tensor(labels, dtype=torch.int64, device=self.device)
            self.step += 1
            yield torch.stack(images), labels, valid
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]

    def seek(self, epoch: int, step: int) -> None:
        """Continue at ``step`` of ``epoch`` (every sample is a function of its index alone)."""
        self.epoch, self.step = epoch, step
