"""BatchNorm that keeps its arithmetic and its running statistics in fp32 at any precision.

Under bf16 an adder layer's output sits near ``-K * E|x - w|`` (about -140 in ResNet-20's
first layer, -3,900 deep in ResNet-50) where bf16's spacing is 1 to 32: rounding it before
normalisation costs up to 4% (ResNet-20) and 7% (ResNet-50) of the normalised signal's
RMS, and running statistics kept in bf16 stop moving once an update is below half that
spacing. So the adder op hands this layer fp32, and the layer returns its weights' dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class BatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.training:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(
            x.float(),
            self.running_mean,
            self.running_var,
            self.weight.float(),
            self.bias.float(),
            self.training,
            self.momentum,
            self.eps,
        )
        return y.to(self.weight.dtype)


def _norms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def average_running_stats(model: nn.Module) -> None:
    """Average every BatchNorm's running statistics across the ranks of the default group.

    Each rank normalises its own micro-batches, so without this the ranks' statistics drift
    apart while their weights stay equal: evaluation would mix per-rank models and the
    checkpoint would hold rank 0's alone. Averaging (rather than broadcasting rank 0's)
    keeps what every shard saw; with equal shard sizes the mean of the ranks' running means
    is the running mean of the global batch.
    """
    stats = [t for _, m in _norms(model) for t in (m.running_mean, m.running_var)]
    if not stats:
        return
    flat = torch.cat([t.reshape(-1) for t in stats])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, part in zip(stats, flat.split([t.numel() for t in stats])):
        t.copy_(part.view_as(t))


@contextmanager
def reestimated(model: nn.Module, batches: Iterable[torch.Tensor]) -> Iterator[dict]:
    """Inside: every BatchNorm's running statistics are the plain average of its batch
    statistics over ``batches`` (the model's inputs, run in training mode without gradients),
    averaged across ranks when distributed. Yields them as state-dict entries. On exit the
    model has its own statistics, momenta and mode back, bit for bit.

    Running averages trail a network whose weights move fast (an AdderNet's outputs do early
    in training); statistics of the current weights do not ("precise BN").
    """
    norms = _norms(model)
    saved = [(m.momentum, [b.clone() for b in m.buffers(recurse=False)]) for _, m in norms]
    was_training = model.training
    try:
        model.train()
        for _, m in norms:
            m.reset_running_stats()
        seen = 0
        with torch.no_grad():
            for x in batches:
                for _, m in norms:  # momentum 1/(i+1): the running value is the mean so far
                    m.momentum = 1.0 / (seen + 1)
                model(x)
                seen += 1
        if not seen:
            raise ValueError("BatchNorm re-estimation needs at least one batch")
        if dist.is_initialized() and dist.get_world_size() > 1:
            average_running_stats(model)
        model.train(was_training)
        yield {
            f"{name}.{key}": getattr(m, key).detach().clone()
            for name, m in norms
            for key in ("running_mean", "running_var")
        }
    finally:
        for (_, m), (momentum, buffers) in zip(norms, saved):
            m.momentum = momentum
            for b, old in zip(m.buffers(recurse=False), buffers):
                b.copy_(old)
        model.train(was_training)
