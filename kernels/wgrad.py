"""Weight gradient (full-precision rule) through the identity

    dW[o, k] = sum_p g[o, p] * x_col[k, p]  -  W[o, k] * sum_p g[o, p]

The first term is exactly an ordinary convolution's weight gradient (zero padding included),
so cuDNN computes it, on tensor cores for fp16/bf16; the second is a rank-1 correction with
the per-channel sum of g. Neither builds the unfolded input. Why this and not a Triton
adder-style kernel: docs/kernels.md ("Weight gradient").
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .launch import check_args, output


@contextmanager
def _ieee_fp32():
    """fp32 stays fp32: TF32's 10-bit mantissa in the GEMM term would not survive the
    cancellation against the correction term."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def grad_weight(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_p g * (x_col - w)`` in w's dtype; the GEMM term in x's dtype with fp32 accumulation."""
    oh, ow = check_args(x, w, stride, padding)
    n, o = x.shape[0], w.shape[0]
    if tuple(g.shape) != (n, o, oh, ow):
        raise ValueError(f"g must be {(n, o, oh, ow)}, got {tuple(g.shape)}")
    gw = output(w.shape, w, w.dtype, out)
    g = g.to(x.dtype)
    # Only its shape is read: an expanded scalar, as torch.nn.grad.conv2d_weight does.
    shape_only = x.new_empty(1).expand(w.shape)
    with _ieee_fp32():
        _, gemm, _ = torch.ops.aten.convolution_backward(
            g, x, shape_only, None, [stride, stride], [padding, padding], [1, 1],
            False, [0, 0], 1, [False, True, False])
    gsum = g.sum(dim=(0, 2, 3), dtype=torch.float32)
    gw.copy_(gemm.float().sub_(w.float() * gsum[:, None, None, None]))
    return gw
