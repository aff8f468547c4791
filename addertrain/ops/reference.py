"""Reference adder convolution in plain PyTorch (CPU and CUDA).

The batch is processed in blocks of whole images. A block is copied into a
zero-padded channels-last buffer in the accumulation dtype, and each of its output
pixels' patches becomes one row of ``cols`` ``[rows, K]`` (``K = kh*kw*C_in``, ordered
``(kh, kw, C_in)``; the weight is permuted to the same order). Forward and input
gradient then walk ``cols`` ``R`` rows at a time through one ``[R, C_out, K]``
buffer, so the ``[C_out, K, N*L]`` tensor of the official release never exists;
the weight gradient is one GEMM per block and a rank-1 term (its sign ablation, not a
GEMM, walks the rows as the forward does).

Extra memory: each of forward, grad_input and grad_weight allocates at most,
beyond its inputs and its output,

    b * (B*(C_in*Hp*Wp + L*(K + C_out)) + (R + 3)*C_out*K)   bytes,
    B = min(N, max(1, BLOCK_ELEMENTS // (L*K)))      images per block,
    R = min(B*L, max(1, CHUNK_ELEMENTS // (C_out*K))) rows per chunk,

with ``L = OH*OW`` output pixels per image, ``Hp, Wp`` the padded input size and
``b`` the accumulation dtype's size (4, or 8 for fp64): one block's padded input
(or its input gradient), its unfolded input, its output (or output gradient) rows,
the chunk buffer and weight-sized temporaries. It does not grow with the batch.
:func:`extra_bytes_bound` computes it; tests/test_reference_op.py measures it.

Both constants are 2**21 elements (8 MiB in fp32). In a sweep over 2**18 to 2**22 on
the 2-core AMD EPYC (Zen 5, 1 MiB L2 per core, 32 MiB L3) this was written on, 2**20 and
2**21 were equally fast (docs/reference-op.md): the buffer and a block's patch rows stay
in L3, and smaller chunks pay more per-op overhead than they gain in locality. The larger
of the two halves the number of short parallel regions, which is what costs most when
other processes share the cores.
"""

from __future__ import annotations

import torch

from addertrain.ops import native

CHUNK_ELEMENTS = 1 << 21  # elements of the [R, C_out, K] buffer
BLOCK_ELEMENTS = 1 << 21  # elements of one block's patch rows (at least one image)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_size(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def padded(k: int) -> int:
    """Width of a patch row: ``K`` rounded up to the native kernels' vector width."""
    return -(-k // native.WIDTH) * native.WIDTH


def block_images(n: int, pixels: int, k: int) -> int:
    return min(n, max(1, BLOCK_ELEMENTS // (pixels * k)))


def chunk_rows(rows: int, c_out: int, k: int) -> int:
    return min(rows, max(1, CHUNK_ELEMENTS // (c_out * k)))


def extra_bytes_bound(x_shape, w_shape, stride: int, padding: int, dtype: torch.dtype) -> int:
    """The bound of the module docstring for ``x_shape`` (NCHW) and ``w_shape`` (OIHW)."""
    n, c, h, w = x_shape
    o, _, kh, kw = w_shape
    oh, ow = out_size(h, w, kh, kw, stride, padding)
    pixels, k = oh * ow, padded(c * kh * kw)
    b = block_images(n, pixels, k)
    r = chunk_rows(b * pixels, o, k)
    elements = b * (c * (h + 2 * padding) * (w + 2 * padding) + pixels * (k + o)) + (r + 3) * o * k
    return elements * torch.empty((), dtype=acc_dtype(dtype)).element_size()


def _channels_last(t: torch.Tensor, dtype: torch.dtype, pad: int = 0) -> torch.Tensor:
    """``t`` (NCHW) as a fresh ``[N, H+2pad, W+2pad, C]`` tensor in ``dtype``, zero border."""
    n, c, h, w = t.shape
    shape = (n, h + 2 * pad, w + 2 * pad, c)
    out = t.new_zeros(shape, dtype=dtype) if pad else t.new_empty(shape, dtype=dtype)
    out[:, pad : pad + h, pad : pad + w].copy_(t.permute(0, 2, 3, 1))
    return out


def _patch_view(t: torch.Tensor, kh: int, kw: int, stride: int, oh: int, ow: int) -> torch.Tensor:
    """``[N, OH, OW, kh, kw, C]`` view of the patches of a contiguous padded NHWC tensor."""
    sn, sh, sw, sc = t.stride()
    return t.as_strided(
        (t.shape[0], oh, ow, kh, kw, t.shape[3]), (sn, sh * stride, sw * stride, sh, sw, sc)
    )


class _Geometry:
    """Shapes of one call, and its blocks of whole images."""

    def __init__(self, x, w, stride, padding):
        self.n, self.c, self.h, self.w = x.shape
        self.o, _, self.kh, self.kw = w.shape
        self.stride, self.padding = stride, padding
        self.oh, self.ow = out_size(self.h, self.w, self.kh, self.kw, stride, padding)
        self.k = self.c * self.kh * self.kw
        self.kp = padded(self.k)
        self.dtype = acc_dtype(x.dtype)
        self.native = native.usable(x.new_empty((), dtype=self.dtype))
        self.images = block_images(self.n, self.oh * self.ow, self.kp)

    def blocks(self):
        for start in range(0, self.n, self.images):
            yield slice(start, min(self.n, start + self.images))

    def cols(self, x):
        """``[images*OH*OW, Kp]`` patch rows of ``x`` in the accumulation dtype, zero past K
        (zeros add nothing to any rule: ``|0 - 0| = 0``)."""
        xp = _channels_last(x, self.dtype, self.padding)
        patches = _patch_view(xp, self.kh, self.kw, self.stride, self.oh, self.ow)
        cols = xp.new_empty((x.shape[0] * self.oh * self.ow, self.kp))
        cols[:, self.k :].zero_()
        self._unpad(cols).copy_(patches)
        return cols

    def _unpad(self, cols):
        """``[images, OH, OW, kh, kw, C]`` view of the first K columns of patch rows."""
        return (
            cols[:, : self.k]
            .unflatten(0, (-1, self.oh, self.ow))
            .unflatten(-1, (self.kh, self.kw, self.c))
        )

    def weight_rows(self, w):
        """``[C_out, Kp]``, zero past K."""
        rows = w.new_zeros((self.o, self.kp), dtype=self.dtype)
        rows[:, : self.k].view(self.o, self.kh, self.kw, self.c).copy_(w.permute(0, 2, 3, 1))
        return rows

    def chunk_buffer(self, like):
        return like.new_empty(
            (chunk_rows(self.images * self.oh * self.ow, self.o, self.kp), self.o, self.kp),
            dtype=self.dtype,
        )

    def fold(self, dcols):
        """col2im: ``[images*OH*OW, Kp]`` patch gradients -> ``[images, C, H, W]`` view."""
        source = self._unpad(dcols)
        p = self.padding
        gxp = dcols.new_zeros((source.shape[0], self.h + 2 * p, self.w + 2 * p, self.c))
        target = _patch_view(gxp, self.kh, self.kw, self.stride, self.oh, self.ow)
        for i in range(self.kh):
            for j in range(self.kw):
                target[:, :, :, i, j].add_(source[:, :, :, i, j])
        return gxp[:, p : p + self.h, p : p + self.w].permute(0, 3, 1, 2)


def _row_chunks(rows: int, size: int):
    for start in range(0, rows, size):
        yield slice(start, min(rows, start + size))


# Each block's temporaries live in its own function call, so that one block's are
# freed before the next block's are allocated.


def _block_outputs(geo, xb, w2, buf):
    """``[images, C_out, OH, OW]`` outputs ``-sum_k |x - w|`` of one block; ``w2`` is the
    weight transposed to ``[K, ldw]`` on the native path."""
    cols = geo.cols(xb)
    if geo.native:
        y = native.forward_rows(cols, w2, geo.k, geo.o)
    else:
        y = cols.new_empty((cols.shape[0], geo.o))
        for rows in _row_chunks(cols.shape[0], buf.shape[0]):
            b = buf[: rows.stop - rows.start]
            torch.sub(cols[rows, None], w2, out=b).abs_()
            torch.sum(b, 2, out=y[rows])
        y.neg_()
    return y.view(-1, geo.oh, geo.ow, geo.o).permute(0, 3, 1, 2)


# The elementwise input-gradient rules, applied in place to a chunk of ``w - x``
# (addertrain/nn/adder.py); "full" is linear in ``w - x``, so it needs no elementwise pass.
INPUT_RULES = {"hardtanh": lambda d: d.clamp_(-1, 1), "sign": torch.Tensor.sign_}


def _block_patch_grads(geo, xb, gb, w2, buf, rule):
    """``[rows, Kp]`` patch gradients ``sum_o g rule(w - x)`` for one block."""
    cols = geo.cols(xb)
    g2 = _channels_last(gb, geo.dtype).view(-1, geo.o)
    if rule == "full":
        # sum_o g (w - x) = g @ W - x * sum_o g: one GEMM and a rank-1 term
        return cols.mul_(g2.sum(1, keepdim=True).neg_()).addmm_(g2, w2)
    if geo.native:
        native.grad_input_rows(cols, w2, g2, rule)
        return cols
    for rows in _row_chunks(cols.shape[0], buf.shape[0]):
        b = buf[: rows.stop - rows.start]
        INPUT_RULES[rule](torch.sub(w2, cols[rows, None], out=b))
        # the chunk's rows are consumed once b holds them, so they take the result
        torch.bmm(g2[rows, None], b, out=cols[rows, None])
    return cols


def _block_sign_weight_grad(geo, xb, gb, w2, buf, gw):
    """``gw += sum_p g[p,o] sign(x[p,k] - w[o,k])`` for one block: no GEMM, so chunked
    through ``buf`` as the forward is."""
    cols = geo.cols(xb)
    g2 = _channels_last(gb, geo.dtype).view(-1, geo.o)
    for rows in _row_chunks(cols.shape[0], buf.shape[0]):
        b = buf[: rows.stop - rows.start]
        torch.sub(cols[rows, None], w2, out=b).sign_().mul_(g2[rows, :, None])
        gw.add_(b.sum(0))


def _block_weight_grad(geo, xb, gb, gw, gsum):
    cols = geo.cols(xb)
    g2 = _channels_last(gb, geo.dtype).view(-1, geo.o)
    gw.addmm_(g2.t(), cols)
    gsum.add_(g2.sum(0))


def forward(x, w, stride, padding):
    geo = _Geometry(x, w, stride, padding)
    y = x.new_empty((geo.n, geo.o, geo.oh, geo.ow))
    w2, buf = geo.weight_rows(w), None
    if geo.native:
        # [K, ldw]: the kernel reads 16 filters' weights of one k as one vector
        wt = w2.new_zeros((geo.k, padded(geo.o)))
        wt[:, : geo.o].copy_(w2[:, : geo.k].t())
        w2 = wt
    else:
        buf = geo.chunk_buffer(x)
    for images in geo.blocks():
        y[images].copy_(_block_outputs(geo, x[images], w2, buf))
    return y


def grad_weight(g, x, w, stride, padding, rule="full"):
    """``full``: ``dW[o,k] = sum_p g[p,o] x[p,k] - W[o,k] sum_p g[p,o]``, a GEMM per block and a
    rank-1 term; ``sign``: ``dW[o,k] = sum_p g[p,o] sign(x[p,k] - W[o,k])``."""
    geo = _Geometry(x, w, stride, padding)
    gw = x.new_zeros((geo.o, geo.kp), dtype=geo.dtype)
    if rule == "sign":
        w2, buf = geo.weight_rows(w), geo.chunk_buffer(x)
        for images in geo.blocks():
            _block_sign_weight_grad(geo, x[images], g[images], w2, buf, gw)
    elif rule == "full":
        gsum = x.new_zeros(geo.o, dtype=geo.dtype)
        for images in geo.blocks():
            _block_weight_grad(geo, x[images], g[images], gw, gsum)
        gw.addcmul_(geo.weight_rows(w), gsum[:, None], value=-1)
    else:
        raise ValueError(f"weight gradient rule {rule!r} is not full or sign")
    gw = gw[:, : geo.k].unflatten(1, (geo.kh, geo.kw, geo.c)).permute(0, 3, 1, 2)
    return gw.to(w.dtype, memory_format=torch.contiguous_format)


def grad_input(g, x, w, stride, padding, rule="hardtanh"):
    """``dX_col[p,k] = sum_o g[p,o] rule(W[o,k] - X[p,k])``, folded back (col2im); the rule
    is one of INPUT_RULES, the paper's ``clamp(., -1, 1)`` by default."""
    if rule not in (*INPUT_RULES, "full"):
        raise ValueError(f"input gradient rule {rule!r} is not hardtanh, full or sign")
    geo = _Geometry(x, w, stride, padding)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    w2 = geo.weight_rows(w)
    buf = None if geo.native or rule == "full" else geo.chunk_buffer(x)
    for images in geo.blocks():
        gx[images].copy_(geo.fold(_block_patch_grads(geo, x[images], g[images], w2, buf, rule)))
    return gx
