"""Input gradient (HardTanh rule) as a gather:
``gx[n,c,h,w] = sum g[n,o,oh,ow] * clamp(w[o,c,r,s] - x[n,c,h,w], -1, 1)``.

The sum runs over the output pixels that read input pixel (h, w): ``oh*S - P + r = h``, i.e.
``oh = (h + P - r) / S`` where the division is exact and in range. Every program owns a tile
of input pixels and writes it once, so there are no atomics and the result is the same bit
for bit on every run.

Input pixels are split by parity class ``(h % S, w % S)`` (a grid axis): inside one class the
taps r with ``(h + P - r) % S == 0`` are the same for every pixel, so a stride-2 layer loops
over exactly the taps that contribute, with no per-pixel divisibility masks.

The HardTanh factor uses ``clamp(w - x, -1, 1) = 2 * sat(0.5*w + 0.5 - 0.5*x) - 1`` with
sat = clamp to [0, 1]: per element one saturating FMA and one FMA with g, given the host-side
table ``b = 0.5*w + 0.5``. The ``-sum g`` part is a per-pixel window sum, accumulated per row.
The paper's ablation rules (``RULE``, a compile-time constant) take the table ``b = w`` and
accumulate ``g * (w - x)`` ("full", unclipped) or ``g * sign(w - x)`` ("sign") directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune, check_args, load_flat, output, padded_columns, store_flat

# (TM, TN, GM, GN, BK, num_warps[, maxnreg]). Each thread also keeps its x tile: 2*TM*TN live
# values, so the tiles are half the forward's.
TILES = [
    (4, 16, 16, 8, 2, 4),  # 64 pixels x 128 channels: 226 registers, 8 warps per SM
    (4, 16, 32, 4, 2, 4),  # 128 x 64: C_in = 64 layers
    (4, 8, 16, 8, 2, 4, 128),  # 64 x 64 at 16 warps per SM: small late-stage grids, C_in = 64
]
INTERPRETER_TILE = (2, 4, 8, 16, 2, 4)

RULES = ("hardtanh", "full", "sign")  # the kernel's RULE is the index

SHAPE_ARGS = [
    "N",
    "C",
    "H",
    "W",
    "O",
    "OH",
    "OW",
    "CP",
    "sgn",
    "sgo",
    "sgh",
    "sgw",
    "sxn",
    "sxc",
    "sxh",
    "sxw",
    "sdn",
    "sdc",
    "sdh",
    "sdw",
]


@triton.jit
def _accumulate(acc, gsum, gs, goff, valid, bs, cols, xh, MASKED: tl.constexpr, RULE: tl.constexpr):
    """acc += g * sat(b - x/2) and gsum += g for one output channel of one tap (HardTanh);
    acc += g * (w - x) or g * sign(w - x) for the other rules, whose xh is x.

    ptxas turns ``min(max(b - x/2, 0), 1)`` into one FFMA.SAT (x/2 folded in): two FP32
    instructions per element with the FFMA by g.
    """
    gv = load_flat(gs + goff).to(tl.float32)
    if MASKED:
        gv = tl.where(valid, gv, 0.0)
    bv = tl.load(bs + cols)[None, :, :]
    if RULE == 0:
        term = tl.minimum(tl.maximum(bv - xh, 0.0), 1.0)
    elif RULE == 1:
        term = bv - xh
    else:
        term = tl.where(bv > xh, 1.0, 0.0) - tl.where(bv < xh, 1.0, 0.0)
    return acc + gv[:, None, :] * term, gsum + gv


@autotune(TILES, INTERPRETER_TILE, "C")
@triton.jit(do_not_specialize=SHAPE_ARGS)
def _grad_input_kernel(
    g_ptr,
    x_ptr,
    b_ptr,
    gx_ptr,
    N,
    C,
    H,
    W,
    O,
    OH,
    OW,
    CP,
    sgn,
    sgo,
    sgh,
    sgw,
    sxn,
    sxc,
    sxh,
    sxw,
    sdn,
    sdc,
    sdh,
    sdw,
    KH: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    TM: tl.constexpr,
    TN: tl.constexpr,
    GM: tl.constexpr,
    GN: tl.constexpr,
    BK: tl.constexpr,
    RULE: tl.constexpr = 0,
):
    # Rows: pixels (n, i, j) of parity class (ph, pw), i.e. h = ph + S*i, w = pw + S*j.
    ph = tl.program_id(2) // STRIDE
    pw = tl.program_id(2) % STRIDE
    hc = (H - ph + STRIDE - 1) // STRIDE
    wc = (W - pw + STRIDE - 1) // STRIDE
    mc = N * hc * wc
    if tl.program_id(0) * (TM * GM) < mc:
        t = tl.arange(0, GM * GN)
        rows = tl.program_id(0) * (TM * GM) + tl.arange(0, TM)[:, None] * GM + (t // GN)[None, :]
        cols = tl.program_id(1) * (TN * GN) + tl.arange(0, TN)[:, None] * GN + (t % GN)[None, :]
        rc = tl.minimum(rows, mc - 1)
        cc = tl.minimum(cols, C - 1)
        n = rc // (hc * wc)
        i = (rc % (hc * wc)) // wc
        j = rc % wc
        h = ph + STRIDE * i
        w = pw + STRIDE * j
        xoff = (n * sxn + h * sxh + w * sxw)[:, None, :] + (cc * sxc)[None, :, :]
        xh = load_flat(x_ptr + xoff).to(tl.float32)
        if RULE == 0:
            xh = 0.5 * xh
        acc = tl.zeros([TM, TN, GM * GN], tl.float32)
        gsum = tl.zeros([TM, GM * GN], tl.float32)
        o_full = O - O % BK
        # Taps with (ph + P - r) % S == 0; then oh = i + (ph + P - r) / S exactly.
        for r in range((ph + PAD) % STRIDE, KH, STRIDE):
            oh = i + (ph + PAD - r) // STRIDE
            for s in range((pw + PAD) % STRIDE, KH, STRIDE):
                ow = j + (pw + PAD - s) // STRIDE
                valid = (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
                goff = (
                    n * sgn
                    + tl.minimum(tl.maximum(oh, 0), OH - 1) * sgh
                    + tl.minimum(tl.maximum(ow, 0), OW - 1) * sgw
                )
                gs = g_ptr
                bs = b_ptr + (r * KH + s) * O * CP
                for _ in range(0, o_full, BK):
                    for _kk in tl.static_range(BK):
                        acc, gsum = _accumulate(
                            acc, gsum, gs, goff, valid, bs, cols, xh, KH + PAD > 1, RULE
                        )
                        gs += sgo
                        bs += CP
                for _ in range(o_full, O):
                    acc, gsum = _accumulate(
                        acc, gsum, gs, goff, valid, bs, cols, xh, KH + PAD > 1, RULE
                    )
                    gs += sgo
                    bs += CP
        if RULE == 0:
            gx = 2.0 * acc - gsum[:, None, :]
        else:
            gx = acc
        doff = (n * sdn + h * sdh + w * sdw)[:, None, :] + (cc * sdc)[None, :, :]
        keep = (rows < mc)[:, None, :] & (cols < C)[None, :, :]
        store_flat(gx_ptr + doff, gx.to(gx_ptr.dtype.element_ty), keep)


def weight_table(w: torch.Tensor, half: bool = True) -> torch.Tensor:
    """``0.5*w + 0.5`` (``half``, the HardTanh rule's) or ``w`` in fp32 as ``[kh*kw*O, C_pad]``:
    row (r, s, o), input channels contiguous."""
    o, c, kh, kw = w.shape
    table = torch.zeros((kh * kw * o, padded_columns(c)), device=w.device, dtype=torch.float32)
    table[:, :c] = w.permute(2, 3, 0, 1).reshape(kh * kw * o, c).float()
    if half:
        table[:, :c].mul_(0.5).add_(0.5)
    return table


def grad_input(
    g: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int,
    padding: int,
    rule: str = "hardtanh",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_o g * rule(w - x_col)`` folded onto x's pixels, in x's dtype and format; the rule
    is one of RULES, the paper's ``clamp(., -1, 1)`` by default."""
    if rule not in RULES:
        raise ValueError(f"input gradient rule {rule!r} is not one of {', '.join(RULES)}")
    oh, ow = check_args(x, w, stride, padding)
    n, c, h, wd = x.shape
    o, kh = w.shape[0], w.shape[2]
    if tuple(g.shape) != (n, o, oh, ow):
        raise ValueError(f"g must be {(n, o, oh, ow)}, got {tuple(g.shape)}")
    gx = output(x.shape, x, x.dtype, out)
    if gx.numel() == 0:
        return gx
    table = weight_table(w, half=rule == "hardtanh")
    # The largest parity class (ph = pw = 0) sets the grid; smaller classes skip their last rows.
    rows = n * (-(-h // stride)) * (-(-wd // stride))

    def grid(meta):
        return (
            triton.cdiv(rows, meta["TM"] * meta["GM"]),
            triton.cdiv(c, meta["TN"] * meta["GN"]),
            stride * stride,
        )

    _grad_input_kernel[grid](
        g,
        x,
        table,
        gx,
        n,
        c,
        h,
        wd,
        o,
        oh,
        ow,
        table.shape[1],
        *g.stride(),
        *x.stride(),
        *gx.stride(),
        KH=kh,
        STRIDE=stride,
        PAD=padding,
        RULE=RULES.index(rule),
    )
    return gx
