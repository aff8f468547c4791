"""The official AdderNet release's formulation, as the baseline of ``addertrain bench op``.

im2col turns the input into ``X`` ``[K, N*L]`` and the weight into ``W`` ``[C_out, K]``;
every function then broadcasts their difference to a ``[C_out, K, N*L]`` tensor:

    forward:      Y  = -|X[None] - W[:, :, None]|.sum(1)
    grad_weight:  dW = ((X[None] - W[:, :, None]) * G[:, None]).sum(2),
                  then dW / ||dW|| * sqrt(numel(dW)) / 5
    grad_input:   dX = (-(X[None] - W[:, :, None]).clamp(-1, 1) * G[:, None]).sum(0),
                  then col2im

The weight gradient carries the release's normalisation inside the backward: it is
the paper's adaptive learning rate with eta = 0.2 = 1/5, applied per layer and per
process. Train a model on this backend with the ALR switched off (it is already in
the gradient). Unlike the release, the backward unfolds the input again instead of
keeping ``X`` from the forward (the backend interface saves only ``x``), which adds
one im2col per backward call to the baseline's time and nothing to its peak.
Same interface and dtypes as :mod:`addertrain.ops.reference`; written for
comparison, not for training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from addertrain.ops.reference import acc_dtype, out_size

ALR_ETA = 0.2


def _columns(x, kh, kw, stride, padding):
    """im2col: ``[K, N*L]`` in the accumulation dtype, columns ordered (image, pixel)."""
    cols = F.unfold(x.to(acc_dtype(x.dtype)), (kh, kw), padding=padding, stride=stride)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


def _operands(x, w, stride, padding):
    cols = _columns(x, w.shape[2], w.shape[3], stride, padding)
    return cols, w.reshape(w.shape[0], -1).to(cols.dtype)


def _grad_columns(g, dtype):
    """``[C_out, N*L]`` output gradient in the column order of :func:`_columns`."""
    return g.to(dtype).transpose(0, 1).reshape(g.shape[1], -1)


def forward(x, w, stride, padding):
    n, o = x.shape[0], w.shape[0]
    oh, ow = out_size(x.shape[2], x.shape[3], w.shape[2], w.shape[3], stride, padding)
    cols, w2 = _operands(x, w, stride, padding)
    y = -(cols[None] - w2[:, :, None]).abs().sum(1)
    return y.view(o, n, oh, ow).transpose(0, 1).to(x.dtype, memory_format=torch.contiguous_format)


def _release_rule(rule, release):
    if rule != release:
        raise ValueError(
            f"the unfold baseline has the release's rule {release!r} only, not {rule!r}"
        )


def grad_weight(g, x, w, stride, padding, rule="full"):
    _release_rule(rule, "full")
    cols, w2 = _operands(x, w, stride, padding)
    gc = _grad_columns(g, cols.dtype)
    gw = ((cols[None] - w2[:, :, None]) * gc[:, None]).sum(2)
    gw = gw / gw.norm() * math.sqrt(gw.numel()) * ALR_ETA
    return gw.view_as(w).to(w.dtype)


def grad_input(g, x, w, stride, padding, rule="hardtanh"):
    _release_rule(rule, "hardtanh")
    n, c, h, wd = x.shape
    cols, w2 = _operands(x, w, stride, padding)
    gc = _grad_columns(g, cols.dtype)
    dcols = (-(cols[None] - w2[:, :, None]).clamp(-1, 1) * gc[:, None]).sum(0)
    dcols = dcols.view(dcols.shape[0], n, -1).transpose(0, 1)
    gx = F.fold(dcols, (h, wd), (w.shape[2], w.shape[3]), padding=padding, stride=stride)
    return gx.to(x.dtype)
