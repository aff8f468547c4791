"""What the three adder kernels share: argument checks, output allocation, autotuning setup.

Tensors are 4-D: x ``[N, C, H, W]`` (any strides, NCHW or channels-last), w ``[O, C, k, k]``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from addertrain.errors import UserError

# Under the interpreter every config would be run once per key just to time it, on the CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kernel offsets are int32: every tensor must stay below 2**31 elements.
MAX_ELEMENTS = 2**31 - 1
# The transposed weight copies are padded to this many columns so the per-column
# weight loads need neither a mask nor a clamp (they then use immediate offsets).
COLUMN_PAD = 256


def check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise UserError(
            f"the triton adder kernels got a tensor on {t.device}; they need a CUDA device, "
            "or TRITON_INTERPRET=1 set before import to run on the CPU (slow, for tests)"
        )


def check_args(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> tuple[int, int]:
    """Validates the shapes and returns the output size (OH, OW)."""
    check_device(x)
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"adder conv needs 4-D x and w, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but w expects {w.shape[1]} (groups=1 only)")
    if w.shape[2] != w.shape[3]:
        raise ValueError(f"only square kernels are supported, got {w.shape[2]}x{w.shape[3]}")
    if x.dtype not in DTYPES or w.dtype not in DTYPES:
        raise ValueError(f"adder kernels take fp32/fp16/bf16, got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but w on {w.device}")
    if stride < 1 or padding < 0:
        raise ValueError(f"need stride >= 1 and padding >= 0, got {stride} and {padding}")
    k = w.shape[2]
    oh = (x.shape[2] + 2 * padding - k) // stride + 1
    ow = (x.shape[3] + 2 * padding - k) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"a {k}x{k} kernel does not fit a {x.shape[2]}x{x.shape[3]} input "
            f"with padding {padding}"
        )
    n, o, c = x.shape[0], w.shape[0], w.shape[1]
    padded_table = w.numel() + COLUMN_PAD * k * k * max(o, c)
    if max(x.numel(), n * o * oh * ow, padded_table) > MAX_ELEMENTS:
        raise ValueError(
            "adder kernels use int32 offsets: split the batch so every tensor "
            "has fewer than 2**31 elements"
        )
    return oh, ow


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """Outputs follow the input's layout, as torch's conv2d does."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def output(shape, like: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """A fresh output tensor, or ``out`` after checking that it can take the result.

    ``out`` exists so tests can hand in a poisoned (NaN-filled) buffer: any element the
    kernel fails to write then shows up.
    """
    if out is None:
        return torch.empty(
            shape, device=like.device, dtype=dtype, memory_format=memory_format_of(like)
        )
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != like.device:
        raise ValueError(
            f"out must be {tuple(shape)} {dtype} on {like.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def padded_columns(n: int) -> int:
    return -(-n // COLUMN_PAD) * COLUMN_PAD


def tile_configs(shapes: list[tuple], small: tuple) -> list[triton.Config]:
    """Autotune configs from (TM, TN, GM, GN, BK, num_warps[, maxnreg]) tuples; one small config
    when interpreting.

    A program owns a (TM*GM) x (TN*GN) output tile; its GM*GN threads each hold a TM x TN
    register tile (see docs/kernels.md). ``maxnreg`` caps the registers per thread so more
    warps fit on an SM (the compiler then keeps spills out of the hot loop or the config
    loses the autotuning). The interpreter gets ``small`` only, so tests run each kernel once
    per call and cover tiles that do not divide the problem.
    """
    if not INTERPRET:
        # One thread per position of the last (GM*GN) axis: no wrap-around in the layout.
        assert all(s[2] * s[3] == 32 * s[5] and s[1] * s[3] <= COLUMN_PAD for s in shapes)
    configs = []
    for tm, tn, gm, gn, bk, warps, *cap in [small] if INTERPRET else shapes:
        configs.append(
            triton.Config(
                dict(TM=tm, TN=tn, GM=gm, GN=gn, BK=bk),
                num_warps=warps,
                num_stages=1,
                maxnreg=cap[0] if cap else None,
            )
        )
    return configs


def _quick_bench(kernel_call, quantiles):
    """The autotuner's timing, shortened from 25 + 100 ms per config to 5 + 25 ms: the
    configs differ by tens of percent, and the GPU check compiles and times every config of
    every test shape within its time limit."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def autotune(tiles: list[tuple], small: tuple, columns_arg: str):
    """The autotuning decorator both Triton kernels use: keyed on the problem shape, configs
    from ``tiles``, pruned by ``column_waste_pruner(columns_arg)``. ``cache_results``: the
    timings go to Triton's cache directory beside the compiled kernels, so another process
    on the node (the next rank, the next launch) takes the chosen config without timing
    again (addertrain/warmup.py); the interpreter caches nothing."""
    return triton.autotune(
        configs=tile_configs(tiles, small),
        key=["N", "C", "H", "W", "O", "KH", "STRIDE", "PAD"],
        prune_configs_by={"early_config_prune": column_waste_pruner(columns_arg)},
        do_bench=_quick_bench,
        cache_results=True,
    )


def column_waste_pruner(columns_arg: str):
    """``early_config_prune`` for triton.autotune: skip tiles that waste columns.

    A config whose column tile (TN*GN) leaves more than a quarter of its columns idle on this
    shape (e.g. 128-wide tiles on C_out = 64) is not timed, unless no config does better;
    this also halves the configs compiled and timed per shape.
    """

    def waste(config, n):
        width = config.kwargs["TN"] * config.kwargs["GN"]
        return 1 - n / (-(-n // width) * width)

    def prune(configs, named_args, **kwargs):
        n = named_args[columns_arg]
        limit = max(0.25, min(waste(c, n) for c in configs))
        return [c for c in configs if waste(c, n) <= limit]

    return prune


@triton.jit
def load_flat(ptrs):
    """``tl.load(ptrs)`` through a 1-D view.

    Triton's coalescing pass picks a load's layout from the address contiguity it can prove;
    with runtime strides it can prove none, and for a 2-D/3-D tile Triton 3.6 (the GPU
    machine's) then orders the axes first-to-last, against the thread axis (the last) of the
    accumulator. Every use became a shared-memory round trip with barriers inside the hot
    loop. A 1-D load has only one order, and its reshape back lands on the accumulator's.
    """
    return tl.reshape(tl.load(tl.reshape(ptrs, [ptrs.numel])), ptrs.shape)


@triton.jit
def store_flat(ptrs, values, mask):
    """``tl.store`` through a 1-D view, for the reason given in ``load_flat``: a 3-D store
    with unprovable contiguity would otherwise pull the accumulator into its layout."""
    tl.store(
        tl.reshape(ptrs, [ptrs.numel]),
        tl.reshape(values, [ptrs.numel]),
        mask=tl.reshape(mask, [ptrs.numel]),
    )
