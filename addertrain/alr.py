"""The paper's adaptive learning rate, computed once per optimizer step on the global gradient.

For adder layer ``l``: ``alpha_l = eta * sqrt(k_l) / ||g_l||_2`` with ``k_l`` the number of
elements of ``W_l`` and ``g_l`` its gradient for the whole global batch. The optimizer sees
gradients after DeepSpeed has all-reduced, accumulated and unscaled them, so the update does
not depend on the number of workers. When DeepSpeed hands each rank only a shard of a
layer's flat gradient (ZeRO 1/2, its bf16 optimizer), the per-layer squared norms are summed
across ranks as one small vector.

The paper's learning-rate ablations replace the ALR (``mode``, the recipe's ``adder.lr``):
``fixed`` leaves the adder gradients as they are (the global schedule alone), ``increased``
multiplies every adder layer's gradient by one constant, ``increase``: a larger learning
rate for the adder filters, the same for all layers, where the ALR adapts it per layer.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from addertrain.config import LR_MODES
from addertrain.models import adder_layers


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """One group per adder weight (so its norm survives DeepSpeed's per-group flattening),
    one group for everything else. ``numel`` is each group's full size, so a rank can tell
    when DeepSpeed handed it only a slice."""
    adder = {id(m.weight): name for name, m in adder_layers(model)}
    groups = [
        {
            "params": [p],
            "weight_decay": weight_decay,
            "alr_numel": p.numel(),
            "numel": p.numel(),
            "name": adder[id(p)],
        }
        for p in model.parameters()
        if id(p) in adder
    ]
    rest = [p for p in model.parameters() if id(p) not in adder]
    groups.append(
        {
            "params": rest,
            "weight_decay": weight_decay,
            "alr_numel": 0,
            "numel": sum(p.numel() for p in rest),
            "name": "rest",
        }
    )
    return groups


def scales(sq_norms: torch.Tensor, numels: torch.Tensor, eta: float) -> torch.Tensor:
    """``eta * sqrt(k) / ||g||``; a layer whose gradient is exactly zero keeps scale 1."""
    norms = sq_norms.sqrt()
    return torch.where(
        norms > 0, eta * numels.sqrt() / norms.clamp_min(1e-30), torch.ones_like(norms)
    )


def clip_factor(sq_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (||g|| + 1e-6))``, torch's ``clip_grad_norm_`` rule."""
    return (max_norm / (sq_norm.sqrt() + 1e-6)).clamp(max=1.0)


class AdderSGD(torch.optim.SGD):
    """SGD that rescales each adder layer's gradient by its ALR, and clips the gradient of
    the other parameters, before the usual update.

    Weight decay and momentum act on the rescaled gradient, as when the official release
    rescales inside the layer's backward. ``clip`` (``optim.grad_clip``) bounds the norm of
    the parameters the ALR does not normalise (stem, BatchNorm, classifier): an adder
    layer's rescaled gradient has the fixed norm ``eta * sqrt(k)`` whatever the clip, and its
    raw norm, far larger than the rest's, would otherwise decide how much the rest is cut.

    Under ZeRO 1/2 DeepSpeed calls ``step`` once per parameter group, each group's gradient
    partition made just before its call. ``once_per_step`` computes every group's factor from
    DeepSpeed's gradient partitions before that loop, in one all-reduce, and each per-group
    call applies its own; without it each call would all-reduce its group's norm alone.
    """

    def __init__(
        self, groups, lr, momentum=0.0, nesterov=False, eta=0.2, mode="alr", increase=1.0, clip=None
    ):
        if mode not in LR_MODES:
            raise ValueError(
                f"adder learning-rate mode {mode!r} is not one of {', '.join(LR_MODES)}"
            )
        super().__init__(groups, lr=lr, momentum=momentum, nesterov=nesterov)
        self.eta, self.mode, self.increase, self.clip = eta, mode, increase, clip
        # the latest ALR scale of each layer and clip factor, kept on the device: reading
        # them every step would synchronise the GPU
        self._scales: dict[str, torch.Tensor] = {}
        self._clip: torch.Tensor | None = None
        # cost since the last summary(): seconds, bytes all-reduced, all-reduces, optimizer steps
        self._cost = [0.0, 0, 0, 0]
        # factors computed ahead of DeepSpeed's per-group calls, by id of the group
        self._ahead: dict[int, torch.Tensor] = {}
        self._owner_cache: dict[tuple, torch.Tensor] = {}

    def _sharded(self, groups) -> bool:
        """True when this rank holds only a slice of some group (DeepSpeed flattened and
        partitioned it), so the norms must be summed across ranks."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        return any(sum(p.numel() for p in g["params"]) != g["numel"] for g in groups)

    @torch.no_grad()
    def rescale_gradients(self) -> None:
        """The ALR on the adder groups and the clip on the rest, from one vector of squared
        norms of the global gradient."""
        groups = self._rescaled_groups()
        if not groups:
            return
        start = time.perf_counter()
        grads = [[p.grad for p in g["params"] if p.grad is not None] for g in groups]
        ahead = [self._ahead.pop(id(g), None) for g in groups]
        if all(a is not None for a in ahead):
            factors = ahead
        else:
            factors = self._factors(groups, grads, self._sharded(groups))
        for gs, a in zip(grads, factors):
            for t in gs:
                t.mul_(a.to(t.dtype))
        self._cost[0] += time.perf_counter() - start

    @torch.no_grad()
    def factors_ahead(self, grads: list[list[torch.Tensor]], sharded: bool) -> None:
        """Every group's factor from ``grads`` (this rank's gradient pieces, one list per
        group of ``param_groups``), for the per-group ``step`` calls that follow."""
        start = time.perf_counter()
        index = {id(g): i for i, g in enumerate(self.param_groups)}
        groups = self._rescaled_groups()
        if groups:
            factors = self._factors(groups, [grads[index[id(g)]] for g in groups], sharded)
            self._ahead = {id(g): a for g, a in zip(groups, factors)}
        self._cost[0] += time.perf_counter() - start

    def _owners(self, counts: list[int], device) -> torch.Tensor:
        """The group index of each gradient tensor, kept on the device (a copy to it every
        step would synchronise a GPU)."""
        key = (tuple(counts), device)
        if key not in self._owner_cache:
            self._owner_cache[key] = torch.repeat_interleave(
                torch.arange(len(counts)), torch.tensor(counts)
            ).to(device)
        return self._owner_cache[key]

    def _rescaled_groups(self) -> list[dict]:
        """The adder groups (unless ``fixed``) then the others (clip on)."""
        return [g for g in self.param_groups if self.mode != "fixed" and g["alr_numel"]] + [
            g for g in self.param_groups if self.clip and not g["alr_numel"]
        ]

    def _factors(self, groups, grads, sharded: bool) -> list[torch.Tensor]:
        """One factor per group: the ALR scale (or the ``increased`` constant) of each adder
        group, the common clip factor of the others; the squared norms summed across ranks in
        one all-reduce if ``sharded``."""
        device = next(p for g in groups for p in g["params"]).device
        flat = [t for gs in grads for t in gs]
        sq = torch.zeros(len(grads), device=device)
        if flat:
            # one fused pass over every tensor: per-tensor reductions cost ~50 us each on a CPU
            norms = torch.stack(torch._foreach_norm(flat, 2, dtype=torch.float32))
            sq.index_add_(0, self._owners([len(gs) for gs in grads], device), norms.pow(2))
        if sharded:
            dist.all_reduce(sq)
            self._cost[1] += sq.numel() * sq.element_size()
            self._cost[2] += 1
        alr = [g for g in groups if g["alr_numel"]]
        if self.mode == "increased":
            factors = [torch.full((), self.increase, device=sq.device)] * len(alr)
        else:
            numels = torch.tensor([g["alr_numel"] for g in alr], dtype=sq.dtype, device=sq.device)
            factors = list(scales(sq[: len(alr)], numels, self.eta))
        if len(groups) > len(alr):
            self._clip = clip_factor(sq[len(alr) :].sum(), self.clip)
            factors += [self._clip] * (len(groups) - len(alr))
        for g, a in zip(alr if self.mode == "alr" else [], factors):
            if not self._scales or g["name"] == next(iter(self._scales)):
                self._cost[3] += 1  # the first adder layer marks a new optimizer step
            self._scales[g["name"]] = a
        return factors

    @property
    def last_scales(self) -> dict[str, float]:
        return {name: float(a) for name, a in self._scales.items()}

    def summary(self) -> dict:
        """For the metrics log: the range of the latest ALR scales, the latest clip factor,
        and the ALR's cost per optimizer step since the previous summary (time, bytes
        all-reduced, number of all-reduces)."""
        s = list(self.last_scales.values())
        out = {} if self._clip is None else {"clip": float(self._clip)}
        if not s:
            return out
        seconds, nbytes, calls, steps = self._cost
        self._cost = [0.0, 0, 0, 0]
        steps = max(steps, 1)
        return {
            "min": min(s),
            "max": max(s),
            "ms": 1e3 * seconds / steps,
            "reduced_bytes": nbytes // steps,
            "all_reduces": calls / steps,
            **out,
        }

    def step(self, closure=None):
        self.rescale_gradients()
        return super().step(closure)


def once_per_step(zero_optimizer, optimizer: AdderSGD) -> None:
    """Under DeepSpeed's ZeRO 1/2 optimizer, compute all of ``optimizer``'s factors at the start
    of each ZeRO step, from the gradient partitions it has reduced by then (its
    ``averaged_gradients``, one list of pieces per group), in one all-reduce instead of one
    per group in the per-group calls that follow. DeepSpeed's other optimizers (ZeRO 0, the
    bf16 one) already call ``step`` once with every group."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(zero_optimizer, DeepSpeedZeroOptimizer) or zero_optimizer.cpu_offload:
        return
    zero_step = zero_optimizer.step

    def step(*args, **kwargs):
        pieces = zero_optimizer.averaged_gradients
        optimizer.factors_ahead(
            [
                [t for t in pieces[i] if not getattr(t, "_zero_padding", False)]
                for i in range(len(optimizer.param_groups))
            ],
            dist.get_world_size(zero_optimizer.dp_process_group) > 1,
        )
        try:
            return zero_step(*args, **kwargs)
        finally:
            optimizer._ahead.clear()  # a step DeepSpeed skipped (overflow) leaves some

    zero_optimizer.step = step
