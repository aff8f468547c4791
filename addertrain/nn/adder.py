"""AdderConv2d: ``Y = -sum |X - W|`` with the AdderNet backward rules.

Every backend implements the same three functions on NCHW tensors:

    forward(x, w, stride, padding) -> y                   y = -sum_k |x_col - w|
    grad_input(g, x, w, stride, padding, rule) -> gx      rule of INPUT_GRADS, HardTanh default
    grad_weight(g, x, w, stride, padding, rule) -> gw     rule of WEIGHT_GRADS, full precision

The rules other than the defaults are the paper's ablations (docs/fidelity.md): per
element, the weight gradient is ``x - w`` ("full") or ``sign(x - w)`` ("sign", the exact
derivative), the input gradient ``clamp(w - x, -1, 1)`` ("hardtanh"), ``w - x`` ("full")
or ``sign(w - x)`` ("sign").

Backends return the input dtype and accumulate in fp32 (fp64 for fp64 inputs); the layer
hands them fp32 (see ``_AdderFunction``).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import nn

from addertrain.config import BACKENDS as RECIPE_BACKENDS
from addertrain.config import INPUT_GRADS, WEIGHT_GRADS
from addertrain.errors import UserError

# "unfold" is the official release's formulation (addertrain.ops.unfold), a benchmark
# baseline whose weight gradient already carries the release's ALR normalisation.
BACKENDS = (*RECIPE_BACKENDS, "unfold")


def triton_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(name: str, device: torch.device) -> ModuleType:
    """The module implementing ``name`` on ``device``; ``auto`` picks Triton on CUDA."""
    if name not in BACKENDS:
        raise UserError(f"adder backend {name!r} is unknown; use one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "reference"
    if name == "reference":
        from addertrain.ops import reference

        return reference
    if name == "unfold":
        from addertrain.ops import unfold

        return unfold
    if not triton_can_run(device):
        raise UserError(
            "the triton adder backend needs a CUDA device, or TRITON_INTERPRET=1 to run "
            "its kernels on the CPU (slow, for tests); use model.backend=reference or auto"
        )
    from addertrain import kernels

    return kernels


class _AdderFunction(torch.autograd.Function):
    """The layer computes in fp32 (fp64 for fp64) whatever its inputs' precision: its output
    goes to BatchNorm unrounded (addertrain/nn/norm.py says why), while the input saved for
    the backward keeps its own, smaller dtype. Autograd casts the gradients back to it."""

    @staticmethod
    def forward(ctx, x, w, stride, padding, backend, grad, input_grad):
        ops = resolve_backend(backend, x.device)
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, ops, grad, input_grad)
        x, w = _widen(x), _widen(w)
        return ops.forward(x, w, stride, padding)

    @staticmethod
    def backward(ctx, g):
        x, w = (_widen(t) for t in ctx.saved_tensors)
        stride, padding, ops, grad, input_grad = ctx.conf
        g = _widen(g).contiguous()
        gx = (
            ops.grad_input(g, x, w, stride, padding, input_grad)
            if ctx.needs_input_grad[0]
            else None
        )
        gw = ops.grad_weight(g, x, w, stride, padding, grad) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None, None, None


def _widen(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def adder_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int = 1,
    padding: int = 0,
    backend: str = "auto",
    grad: str = "full",
    input_grad: str = "hardtanh",
) -> torch.Tensor:
    return _AdderFunction.apply(x, w, stride, padding, backend, grad, input_grad)


def check_rules(backend: str, grad: str, input_grad: str) -> None:
    if grad not in WEIGHT_GRADS:
        raise UserError(
            f"adder weight gradient {grad!r} is unknown; use one of {', '.join(WEIGHT_GRADS)}"
        )
    if input_grad not in INPUT_GRADS:
        raise UserError(
            f"adder input gradient {input_grad!r} is unknown; use one of {', '.join(INPUT_GRADS)}"
        )
    if backend == "unfold" and (grad, input_grad) != ("full", "hardtanh"):
        raise UserError(
            "the unfold backend is the official release's formulation, with its "
            "rules only; use backend reference or triton for the ablation rules"
        )


class AdderConv2d(nn.Module):
    """Adder layer (groups=1, no bias). Weights start from N(0, 1) as in the paper."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        backend: str = "auto",
        grad: str = "full",
        input_grad: str = "hardtanh",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise UserError(
                f"adder backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}"
            )
        check_rules(backend, grad, input_grad)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.backend, self.grad, self.input_grad = backend, grad, input_grad
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adder_conv2d(
            x, self.weight, self.stride, self.padding, self.backend, self.grad, self.input_grad
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, backend={self.backend}, "
            f"grad={self.grad}, input_grad={self.input_grad}"
        )
