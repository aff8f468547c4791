"""The paper's adaptive learning rate, computed once per optimizer step on the global gradient.

For adder layer ``l``: ``alpha_l = eta * sqrt(k_l) / ||g_l||_2`` with ``k_l`` the number of
elements of ``W_l`` and ``g_l`` its gradient for the whole global batch. The optimizer sees
gradients after DeepSpeed has all-reduced, accumulated and unscaled them, so the update does
not depend on the number of workers. When DeepSpeed hands each rank only a shard of a
layer's flat gradient (ZeRO 1/2, its bf16 optimizer), the per-layer squared norms are summed
across ranks as one small vector.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from addertrain.models import adder_layers


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """One group per adder weight (so its norm survives DeepSpeed's per-group flattening),
    one group for everything else."""
    adder = {id(m.weight): name for name, m in adder_layers(model)}
    groups = [{"params": [p], "weight_decay": weight_decay, "alr_numel": p.numel(),
               "name": adder[id(p)]}
              for p in model.parameters() if id(p) in adder]
    rest = [p for p in model.parameters() if id(p) not in adder]
    groups.append({"params": rest, "weight_decay": weight_decay, "alr_numel": 0, "name": "rest"})
    return groups


def scales(sq_norms: torch.Tensor, numels: torch.Tensor, eta: float) -> torch.Tensor:
    """``eta * sqrt(k) / ||g||``; a layer whose gradient is exactly zero keeps scale 1."""
    norms = sq_norms.sqrt()
    return torch.where(norms > 0, eta * numels.sqrt() / norms.clamp_min(1e-30),
                       torch.ones_like(norms))


class AdderSGD(torch.optim.SGD):
    """SGD that rescales each adder layer's gradient by its ALR before the usual update.

    Weight decay and momentum act on the rescaled gradient, as when the official release
    rescales inside the layer's backward.

    Under ZeRO 1/2 DeepSpeed calls ``step`` once per parameter group, each group's gradient
    partition made just before its call, so the per-layer squared norms are then summed
    across ranks one layer per call instead of as one vector per optimizer step.
    """

    def __init__(self, groups, lr, momentum=0.0, nesterov=False, eta=0.2, alr=True):
        super().__init__(groups, lr=lr, momentum=momentum, nesterov=nesterov)
        self.eta, self.alr = eta, alr
        # the latest scale of each layer, kept on the device: reading it every step would
        # synchronise the GPU
        self._scales: dict[str, torch.Tensor] = {}
        # cost since the last summary(): seconds, bytes all-reduced, optimizer steps
        self._cost = [0.0, 0, 0]

    def _alr_groups(self):
        return [g for g in self.param_groups if g.get("alr_numel", 0) > 0]

    def _sharded(self, groups) -> bool:
        """True when this rank holds only a slice of some adder layer (DeepSpeed flattened and
        partitioned the group), so the norms must be summed across ranks."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        return any(sum(p.numel() for p in g["params"]) != g["alr_numel"] for g in groups)

    @torch.no_grad()
    def apply_alr(self) -> None:
        groups = self._alr_groups()
        if not (self.alr and groups):
            return
        start = time.perf_counter()
        grads = [[p.grad for p in g["params"] if p.grad is not None] for g in groups]
        device = next(p for g in groups for p in g["params"]).device
        sq = torch.stack([
            sum((t.float().pow(2).sum() for t in gs), torch.zeros((), device=device))
            for gs in grads])
        if self._sharded(groups):
            dist.all_reduce(sq)
            self._cost[1] += sq.numel() * sq.element_size()
        numels = torch.tensor([g["alr_numel"] for g in groups], dtype=sq.dtype, device=sq.device)
        alpha = scales(sq, numels, self.eta)
        for gs, a in zip(grads, alpha):
            for t in gs:
                t.mul_(a.to(t.dtype))
        for g, a in zip(groups, alpha):
            if not self._scales or g["name"] == next(iter(self._scales)):
                self._cost[2] += 1  # the first adder layer marks a new optimizer step
            self._scales[g["name"]] = a
        self._cost[0] += time.perf_counter() - start

    @property
    def last_scales(self) -> dict[str, float]:
        return {name: float(a) for name, a in self._scales.items()}

    def summary(self) -> dict:
        """For the metrics log: the range of the latest scales, and the ALR's cost per
        optimizer step since the previous summary (time, bytes all-reduced)."""
        s = list(self.last_scales.values())
        if not s:
            return {}
        seconds, nbytes, steps = self._cost
        self._cost = [0.0, 0, 0]
        steps = max(steps, 1)
        return {"min": min(s), "max": max(s), "ms": 1e3 * seconds / steps,
                "reduced_bytes": nbytes // steps}

    def step(self, closure=None):
        self.apply_alr()
        return super().step(closure)

