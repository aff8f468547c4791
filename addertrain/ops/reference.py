"""Reference adder convolution in plain PyTorch (CPU and CUDA).

Works on the unfolded input, one chunk of output pixels at a time, so the
``[C_out, K, N*L]`` tensor of the official release is never built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of the largest [rows, C_out, K] temporary per chunk.
CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unfold(x, kh, kw, stride, padding):
    """[N*L, K] rows of input patches, in the accumulation dtype."""
    cols = F.unfold(x.to(_acc_dtype(x.dtype)), (kh, kw), padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _out_hw(x, w, stride, padding):
    oh = (x.shape[2] + 2 * padding - w.shape[2]) // stride + 1
    ow = (x.shape[3] + 2 * padding - w.shape[3]) // stride + 1
    return oh, ow


def forward(x, w, stride, padding):
    n, o = x.shape[0], w.shape[0]
    oh, ow = _out_hw(x, w, stride, padding)
    cols = _unfold(x, w.shape[2], w.shape[3], stride, padding)
    w2 = w.reshape(o, -1).to(cols.dtype)
    y = torch.cdist(cols, w2, p=1).neg_()
    return y.view(n, oh * ow, o).transpose(1, 2).reshape(n, o, oh, ow).to(x.dtype)


def _rows_of(g):
    n, o = g.shape[:2]
    return g.reshape(n, o, -1).transpose(1, 2).reshape(-1, o)


def grad_weight(g, x, w, stride, padding):
    """dW[o,k] = sum_p g[p,o] x[p,k] - W[o,k] sum_p g[p,o]: one GEMM and a rank-1 term."""
    cols = _unfold(x, w.shape[2], w.shape[3], stride, padding)
    g2 = _rows_of(g).to(cols.dtype)
    w2 = w.reshape(w.shape[0], -1).to(cols.dtype)
    gw = g2.t() @ cols - w2 * g2.sum(0)[:, None]
    return gw.view_as(w).to(w.dtype)


def grad_input(g, x, w, stride, padding):
    """dX_col[p,k] = sum_o g[p,o] clamp(W[o,k] - X[p,k], -1, 1), folded back with col2im."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    cols = _unfold(x, kh, kw, stride, padding)
    g2 = _rows_of(g).to(cols.dtype)
    w2 = w.reshape(o, -1).to(cols.dtype)
    k = w2.shape[1]
    dcols = torch.empty_like(cols)
    rows = max(1, CHUNK_ELEMENTS // (o * k))
    for start in range(0, cols.shape[0], rows):
        xc = cols[start:start + rows]
        d = (w2[None] - xc[:, None]).clamp_(-1, 1)
        torch.bmm(g2[start:start + rows, None], d, out=dcols[start:start + rows, None])
    dcols = dcols.view(n, -1, k).transpose(1, 2)
    return F.fold(dcols, (h, wd), (kh, kw), padding=padding, stride=stride).to(x.dtype)
