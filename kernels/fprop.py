"""Forward adder convolution: ``y[n, o, p] = -sum_k |x_col[n, k, p] - w[o, k]|`` as an implicit
GEMM.

GEMM view: rows are output pixels (n, oh, ow), columns are output channels o, the reduction
runs over k = (r, s, c). The unfolded input is never built: each program decodes its rows
into (n, oh, ow) once, and per kernel tap (r, s) loads ``x[n, c, oh*S - P + r, ow*S - P + s]``
directly, with zero for taps that fall into the padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune, check_args, load_flat, output, padded_columns, store_flat

# (TM, TN, GM, GN, BK, num_warps[, maxnreg]): see tile_configs. TN >= TM because a weight load
# costs one instruction (immediate offsets) and an input load about three (address, padding
# select). Registers and hot-loop mix per config (sm_90, Triton 3.6): docs/kernels.md.
TILES = [
    (8, 16, 16, 8, 2, 4),  # 128 pixels x 128 channels: fewest instructions per element
    (8, 16, 32, 4, 2, 4),  # 256 x 64: C_out = 64 layers
    (4, 16, 16, 8, 2, 4),  # 64 x 128: 166 registers, 12 warps per SM
    (4, 16, 16, 8, 2, 4, 128),  # the same capped at 128 registers: 16 warps per SM
    (4, 16, 32, 4, 2, 4, 128),  # 128 x 64 at 16 warps per SM: C_out = 64 layers
    (4, 8, 16, 8, 2, 4),  # 64 x 64, 96 registers, 20 warps per SM: the 7x7 stage-4 grids
]
INTERPRETER_TILE = (2, 4, 8, 16, 2, 4)  # 16 x 64 tiles: few programs, still tails in tests

SHAPE_ARGS = [
    "N",
    "C",
    "H",
    "W",
    "O",
    "OH",
    "OW",
    "OP",
    "sxn",
    "sxc",
    "sxh",
    "sxw",
    "syn",
    "syo",
    "syh",
    "syw",
]


@triton.jit
def _accumulate(acc, xs, xoff, inside, ws, cols, PAD: tl.constexpr):
    """acc += |x - w| for one input channel of one kernel tap (an outer-difference tile)."""
    xv = load_flat(xs + xoff).to(tl.float32)
    if PAD > 0:
        xv = tl.where(inside, xv, 0.0)
    wv = tl.load(ws + cols).to(tl.float32)
    return acc + tl.abs(xv[:, None, :] - wv[None, :, :])


@autotune(TILES, INTERPRETER_TILE, "O")
@triton.jit(do_not_specialize=SHAPE_ARGS)
def _forward_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    N,
    C,
    H,
    W,
    O,
    OH,
    OW,
    OP,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syo,
    syh,
    syw,
    KH: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    TM: tl.constexpr,
    TN: tl.constexpr,
    GM: tl.constexpr,
    GN: tl.constexpr,
    BK: tl.constexpr,
):
    # Thread t of the GM*GN threads owns rows i*GM + t//GN (i < TM) and columns j*GN + t%GN
    # (j < TN): a TM x TN register tile per thread, the only tensor that lives across the loop.
    t = tl.arange(0, GM * GN)
    rows = tl.program_id(0) * (TM * GM) + tl.arange(0, TM)[:, None] * GM + (t // GN)[None, :]
    cols = tl.program_id(1) * (TN * GN) + tl.arange(0, TN)[:, None] * GN + (t % GN)[None, :]
    M = N * OH * OW
    # Rows past the end compute on a valid pixel and are not stored.
    rc = tl.minimum(rows, M - 1)
    n = rc // (OH * OW)
    oh = (rc % (OH * OW)) // OW
    ow = rc % OW
    c_full = C - C % BK
    acc = tl.zeros([TM, TN, GM * GN], tl.float32)
    for r in range(KH):
        for s in range(KH):
            ih = oh * STRIDE - PAD + r
            iw = ow * STRIDE - PAD + s
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            # Clamped so every load is in bounds; padded taps are zeroed after the load.
            xoff = (
                n * sxn
                + tl.minimum(tl.maximum(ih, 0), H - 1) * sxh
                + tl.minimum(tl.maximum(iw, 0), W - 1) * sxw
            )
            ws = w_ptr + (r * KH + s) * C * OP
            xs = x_ptr
            for _ in range(0, c_full, BK):
                for _kk in tl.static_range(BK):
                    acc = _accumulate(acc, xs, xoff, inside, ws, cols, PAD)
                    xs += sxc
                    ws += OP
            for _ in range(c_full, C):
                acc = _accumulate(acc, xs, xoff, inside, ws, cols, PAD)
                xs += sxc
                ws += OP
    yoff = (n * syn + oh * syh + ow * syw)[:, None, :] + (cols * syo)[None, :, :]
    keep = (rows < M)[:, None, :] & (cols < O)[None, :, :]
    store_flat(y_ptr + yoff, (-acc).to(y_ptr.dtype.element_ty), keep)


def weight_columns(w: torch.Tensor) -> torch.Tensor:
    """w as ``[kh*kw*C, O_pad]``: row (r, s, c), output channels contiguous and zero-padded."""
    o, c, kh, kw = w.shape
    wt = w.new_zeros((kh * kw * c, padded_columns(o)))
    wt[:, :o] = w.permute(2, 3, 1, 0).reshape(kh * kw * c, o)
    return wt


def forward(
    x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``-sum_k |x_col - w|`` in x's dtype and memory format (fp32 accumulation)."""
    oh, ow = check_args(x, w, stride, padding)
    n, c, h, wd = x.shape
    o, kh = w.shape[0], w.shape[2]
    y = output((n, o, oh, ow), x, x.dtype, out)
    if y.numel() == 0:
        return y
    wt = weight_columns(w)
    m = n * oh * ow

    def grid(meta):
        return (triton.cdiv(m, meta["TM"] * meta["GM"]), triton.cdiv(o, meta["TN"] * meta["GN"]))

    _forward_kernel[grid](
        x,
        wt,
        y,
        n,
        c,
        h,
        wd,
        o,
        oh,
        ow,
        wt.shape[1],
        *x.stride(),
        *y.stride(),
        KH=kh,
        STRIDE=stride,
        PAD=padding,
    )
    return y
