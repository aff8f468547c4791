"""The card's measured FP32 ceiling in adder elements per second.

An add-bound kernel: every thread keeps ROWS independent accumulators in registers and adds
``|v - w|`` to each, ``w`` changing every step so nothing can be hoisted. One element costs
the same two FP32 instructions as in the adder kernels (FADD, then FADD with |.|), and there
are no loads, so its rate is the best any adder kernel can reach on this card.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 32  # independent accumulator chains per thread: enough to cover the FP32 latency
UNROLL = 4


@triton.jit
def _add_bound_kernel(
    out_ptr, iters, step, ROWS: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = cols.to(tl.float32)[None, :] * 1e-3 + tl.arange(0, ROWS).to(tl.float32)[:, None]
    acc = tl.zeros([ROWS, BLOCK], tl.float32)
    w = step * 0.0
    for _ in range(iters):
        for _u in tl.static_range(UNROLL):
            acc += tl.abs(v - w)
            w += step
    tl.store(out_ptr + cols, tl.sum(acc, axis=0))


def elements_per_launch(programs: int, block: int, iters: int) -> int:
    return programs * block * ROWS * iters * UNROLL


def launch(programs: int, block: int, iters: int, num_warps: int, device) -> tuple[callable, int]:
    """A zero-argument launcher and the number of adder elements one call computes."""
    out = torch.empty(programs * block, device=device, dtype=torch.float32)

    def call():
        _add_bound_kernel[(programs,)](
            out, iters, 1e-4, ROWS=ROWS, BLOCK=block, UNROLL=UNROLL, num_warps=num_warps
        )
        return out

    return call, elements_per_launch(programs, block, iters)
