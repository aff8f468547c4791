"""Triton adder-convolution kernels (the ``triton`` backend of AdderConv2d).

Same contract as ``addertrain.ops.reference``:

    forward(x, w, stride, padding) -> y             y[n,o,p] = -sum_k |x_col[n,k,p] - w[o,k]|
    grad_input(g, x, w, stride, padding, rule) -> gx    sum_o g * clamp(w - x_col, -1, 1), gathered
    grad_weight(g, x, w, stride, padding, rule) -> gw   sum_p g * (x_col - w)

``rule`` selects the paper's ablations (grad_input: "full" unclipped, "sign"; grad_weight:
"sign"); the defaults are the rules above.

x is ``[N, C, H, W]`` in any memory format, w ``[O, C, k, k]``; fp32/fp16/bf16 with fp32
accumulation; outputs in the input's dtype and memory format. Each function also takes
``out=`` to write into a given tensor. Design and performance model: docs/kernels.md.
"""

from .dgrad import grad_input
from .fprop import forward
from .wgrad import grad_weight

__all__ = ["forward", "grad_input", "grad_weight"]
