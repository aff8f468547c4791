"""Precision of the adder weight gradient's GEMM term with TF32 operands, CPU-emulated.

    dW = conv_weight_grad(x, g) - W * sum(g)          (kernels/wgrad.py)

TF32 is emulated by rounding x and g to a 10-bit mantissa (round to nearest even, and plain
truncation as the worst case) and summing the products in fp32; the reference is fp64 on the
same fp32 inputs. Two cases per ResNet-50 shape: g with a zero sum per output channel (what a
following BatchNorm's backward gives: the correction term vanishes) and g without (the term
cancels part of the GEMM term). Prints the relative Frobenius error of dW per layer.

    python scripts/tf32_wgrad.py [--batch 4] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

# (name, C, O, kernel, stride, input side) of ResNet-50 adder layers
SHAPES = [
    ("3x3 64->64 s1 @56", 64, 64, 3, 1, 56),
    ("3x3 128->128 s1 @28", 128, 128, 3, 1, 28),
    ("3x3 256->256 s1 @14", 256, 256, 3, 1, 14),
    ("3x3 512->512 s1 @7", 512, 512, 3, 1, 7),
    ("3x3 128->128 s2 @56", 128, 128, 3, 2, 56),
    ("1x1 256->64 s1 @56", 256, 64, 1, 1, 56),
    ("1x1 1024->256 s1 @14", 1024, 256, 1, 1, 14),
    ("1x1 512->2048 s1 @7", 512, 2048, 1, 1, 7),
]


def to_tf32(t: torch.Tensor, nearest: bool) -> torch.Tensor:
    """fp32 -> the nearest (or truncated) value with a 10-bit mantissa, as fp32."""
    bits = t.contiguous().view(torch.int32)
    if nearest:
        bits = bits + 0xFFF + ((bits >> 13) & 1)
    return (bits & ~0x1FFF).view(torch.float32)


def gemm(x: torch.Tensor, g: torch.Tensor, w_shape, stride: int, pad: int) -> torch.Tensor:
    return torch.nn.grad.conv2d_weight(x, w_shape, g, stride=stride, padding=pad)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def measure(batch: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    rows = []
    for name, c, o, k, stride, side in SHAPES:
        pad = k // 2
        # an adder layer's input follows BN + ReLU; weights as AdderConv2d initialises them
        x = torch.relu(torch.randn(batch, c, side, side))
        w = torch.randn(o, c, k, k)
        out_side = (side + 2 * pad - k) // stride + 1
        raw = torch.randn(batch, o, out_side, out_side) * 1e-3
        for case, g in (
            ("BN follows: sum(g)=0", raw - raw.mean(dim=(0, 2, 3), keepdim=True)),
            ("sum(g)!=0", raw + 1e-3),
        ):
            s64 = g.double().sum(dim=(0, 2, 3))[:, None, None, None]
            ref = gemm(x.double(), g.double(), w.shape, stride, pad) - w.double() * s64
            s32 = g.sum(dim=(0, 2, 3))[:, None, None, None]
            fp32 = gemm(x, g, w.shape, stride, pad) - w * s32
            row = {"layer": name, "case": case, "fp32": rel(fp32, ref)}
            for label, nearest in (("tf32 nearest", True), ("tf32 truncated", False)):
                t = gemm(to_tf32(x, nearest), to_tf32(g, nearest), w.shape, stride, pad) - w * s32
                row[label] = rel(t, ref)
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| layer | g | fp32 | TF32 (nearest) | TF32 (truncated) |")
    print("|---|---|---|---|---|")
    for r in measure(args.batch, args.seed):
        print(
            f"| {r['layer']} | {r['case']} | {r['fp32']:.1e} | {r['tf32 nearest']:.1e} | "
            f"{r['tf32 truncated']:.1e} |"
        )


if __name__ == "__main__":
    main()
