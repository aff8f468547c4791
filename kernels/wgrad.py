"""Weight gradient (full-precision rule) through the identity

    dW[o, k] = sum_p g[o, p] * x_col[k, p]  -  W[o, k] * sum_p g[o, p]

The first term is exactly an ordinary convolution's weight gradient (zero padding included),
so cuDNN computes it, on tensor cores for fp16/bf16; the second is a rank-1 correction with
the per-channel sum of g. Neither builds the unfolded input. Why this and not a Triton
adder-style kernel: docs/kernels.md ("Weight gradient").

The paper's sign-gradient ablation, ``dW[o, k] = sum_p g[o, p] * sign(x_col[k, p] - W[o, k])``,
is no GEMM: a Triton kernel computes it, one (output channel, k) tile per program looping
over the output pixels. It exists to run the ablation, not tuned for speed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import triton
import triton.language as tl

from .common import INTERPRET, check_args, output

RULES = ("full", "sign")
# (output channels, k, pixels) per program step of the sign kernel: a 16x32x32 fp32 tile
SIGN_TILE = (4, 8, 8) if INTERPRET else (16, 32, 32)


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


# cuDNN's choice for an fp32 3x3 stride-1 weight gradient with TF32 off is Winograd (nonfused)
# on these shapes; its workspace, read off the first H200 run (docs/performance.md: four 3x3
# stride-1 layers, within 5%), is 4 bytes x 36 x ((C + O) x 4x4-output tiles per image x N
# + O x C): up to 4.5x the size of x, which doubled the layer's peak memory against conv2d.
# The GEMM term is therefore computed on slices of the batch and of the output channels
# (exact: the term is a sum over the batch and separable over o) so that this estimate stays
# below the bytes of x, g and w together, in at most MAX_CALLS cuDNN calls; batch slices are
# preferred (output-channel slices copy their part of g).
WINOGRAD_TILE = 4
SPLITS = (1, 2, 4, 8)
MAX_CALLS = 8


def _winograd_bytes(n: int, c: int, o: int, oh: int, ow: int) -> int:
    tiles = -(-oh // WINOGRAD_TILE) * -(-ow // WINOGRAD_TILE)
    return 4 * 36 * ((c + o) * tiles * n + o * c)


def gemm_splits(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, stride: int) -> tuple[int, int]:
    """(batch slices, output-channel slices) for the GEMM term: (1, 1) unless the layer is one
    where cuDNN takes Winograd's workspace (fp32, 3x3, stride 1) and that would exceed the
    budget."""
    n, c, _, _ = x.shape
    o, _, k, _ = w.shape
    oh, ow = g.shape[2:]
    if not (x.dtype == torch.float32 and k == 3 and stride == 1):
        return 1, 1
    budget = (x.numel() + g.numel() + w.numel()) * 4
    options = [(b, q) for b in SPLITS for q in SPLITS if b <= n and q <= o and b * q <= MAX_CALLS]
    need = {(b, q): _winograd_bytes(-(-n // b), c, -(-o // q), oh, ow) for b, q in options}
    fitting = [bq for bq in options if need[bq] <= budget]
    if not fitting:
        return min(options, key=lambda bq: need[bq])
    return min(fitting, key=lambda bq: (bq[0] * bq[1], bq[1]))


def _gemm_term(
    g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, dest: torch.Tensor
) -> None:
    """Writes ``sum_p g[o,p] * x_col[k,p]`` (a convolution's weight gradient) into ``dest``,
    slice by slice; cuDNN computes in x's dtype."""
    batch_split, out_split = gemm_splits(x, g, w, stride)
    o, c, k, _ = w.shape
    for o_part in torch.arange(o).tensor_split(out_split):
        o0, o1 = int(o_part[0]), int(o_part[-1]) + 1
        # Only its shape is read: an expanded scalar, as torch.nn.grad.conv2d_weight does.
        shape_only = x.new_empty(1).expand(o1 - o0, c, k, k)
        part = None
        for xs, gs in zip(x.tensor_split(batch_split), g[:, o0:o1].tensor_split(batch_split)):
            _, gemm, _ = torch.ops.aten.convolution_backward(
                gs,
                xs,
                shape_only,
                None,
                [stride, stride],
                [padding, padding],
                [1, 1],
                False,
                [0, 0],
                1,
                [False, True, False],
            )
            part = gemm if part is None else part.add_(gemm)
        dest[o0:o1] = part


@triton.jit
def _sign_grad_weight_kernel(
    g_ptr,
    x_ptr,
    w_ptr,
    gw_ptr,
    C,
    H,
    W,
    O,
    OH,
    OW,
    P,
    sgn,
    sgo,
    sgh,
    sgw,
    sxn,
    sxc,
    sxh,
    sxw,
    KH: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
    BP: tl.constexpr,
):
    """gw[o, k] = sum_p g[o, p] * sign(x_col[k, p] - w[o, k]), k = (c, r, s); w and gw are
    contiguous ``[O, C*KH*KH]``. Padded positions read x = 0, as in the forward."""
    K = C * KH * KH
    o = tl.program_id(0) * BO + tl.arange(0, BO)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    om, km = o < O, k < K
    c, r, s = k // (KH * KH), (k // KH) % KH, k % KH
    wmask = om[:, None] & km[None, :]
    wv = tl.load(w_ptr + o[:, None] * K + k[None, :], mask=wmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BO, BK], tl.float32)
    for p0 in range(0, P, BP):
        p = p0 + tl.arange(0, BP)
        pm = p < P
        n, oh, ow = p // (OH * OW), (p // OW) % OH, p % OW
        gv = tl.load(
            g_ptr + o[:, None] * sgo + (n * sgn + oh * sgh + ow * sgw)[None, :],
            mask=om[:, None] & pm[None, :],
            other=0.0,
        ).to(tl.float32)
        ih = (oh * STRIDE - PAD)[None, :] + r[:, None]
        iw = (ow * STRIDE - PAD)[None, :] + s[:, None]
        xmask = km[:, None] & pm[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(
            x_ptr + (n * sxn)[None, :] + (c * sxc)[:, None] + ih * sxh + iw * sxw,
            mask=xmask,
            other=0.0,
        ).to(tl.float32)
        d = xv[None, :, :] - wv[:, :, None]
        sign = tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0)
        acc += tl.sum(sign * gv[:, None, :], axis=2)
    tl.store(gw_ptr + o[:, None] * K + k[None, :], acc, mask=wmask)


def _sign_grad_weight(
    g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, gw: torch.Tensor
) -> None:
    n, c, h, wd = x.shape
    o, _, kh, _ = w.shape
    oh, ow = g.shape[2:]
    flat = torch.empty((o, c * kh * kh), device=w.device, dtype=torch.float32)
    bo, bk, bp = SIGN_TILE
    grid = (triton.cdiv(o, bo), triton.cdiv(flat.shape[1], bk))
    _sign_grad_weight_kernel[grid](
        g,
        x,
        w.contiguous(),
        flat,
        c,
        h,
        wd,
        o,
        oh,
        ow,
        n * oh * ow,
        *g.stride(),
        *x.stride(),
        KH=kh,
        STRIDE=stride,
        PAD=padding,
        BO=bo,
        BK=bk,
        BP=bp,
    )
    gw.copy_(flat.view(w.shape))


def grad_weight(
    g: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int,
    padding: int,
    rule: str = "full",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_p g * (x_col - w)`` in w's dtype, the GEMM term in x's dtype with fp32
    accumulation; ``rule="sign"``: ``sum_p g * sign(x_col - w)``, accumulated in fp32."""
    if rule not in RULES:
        raise ValueError(f"weight gradient rule {rule!r} is not one of {', '.join(RULES)}")
    oh, ow = check_args(x, w, stride, padding)
    n, o = x.shape[0], w.shape[0]
    if tuple(g.shape) != (n, o, oh, ow):
        raise ValueError(f"g must be {(n, o, oh, ow)}, got {tuple(g.shape)}")
    gw = output(w.shape, w, w.dtype, out)
    if rule == "sign":
        _sign_grad_weight(g, x, w, stride, padding, gw)
        return gw
    g = g.to(x.dtype)
    # The GEMM term goes straight into gw when both are fp32, else through one fp32 tensor;
    # the correction is applied in place: no other w-sized temporary.
    gemm = (
        gw
        if gw.dtype == x.dtype == torch.float32
        else torch.empty(w.shape, device=w.device, dtype=x.dtype)
    )
    with _ieee_fp32():
        _gemm_term(g, x, w, stride, padding, gemm)
    gsum = g.sum(dim=(0, 2, 3), dtype=torch.float32)
    gemm = gemm.float().addcmul_(w.float(), gsum[:, None, None, None], value=-1)
    if gemm is not gw:
        gw.copy_(gemm)
    return gw
