"""The distinct adder layer shapes of a network, traced without running it: what the
kernel benchmarks measure and what the Triton warm-up compiles."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Layer:
    index: int
    shape: tuple[int, int, int, int, int, int, int, int]  # N, C, H, W, O, k, stride, padding
    count: int  # occurrences in the network

    @property
    def name(self) -> str:
        n, c, h, w, o, k, s, p = self.shape
        return f"{k}x{k} {c}->{o} s{s} @{h}x{w}"

    @property
    def out_hw(self) -> tuple[int, int]:
        n, c, h, w, o, k, s, p = self.shape
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    @property
    def elements(self) -> int:
        """Adder elements |x - w| of one pass: N * OH * OW * O * C * k * k."""
        n, c, h, w, o, k, s, p = self.shape
        oh, ow = self.out_hw
        return n * oh * ow * o * c * k * k


def adder_layer_shapes(arch: str, batch: int, image: int = 224) -> list[Layer]:
    """The distinct adder layer shapes of ``arch`` in network order, with their counts.

    Traced on the meta device through the CNN twin of the network, whose body convs are
    built with the same arguments as the adder layers (stem and classifier excluded).
    """
    import torch
    from torch import nn

    from addertrain.models import create_model

    seen: dict[tuple, int] = {}
    with torch.device("meta"):
        model = create_model(arch, conv="conv")

        def record(module, inputs, _output):
            _, c, h, w = inputs[0].shape
            shape = (
                batch,
                c,
                h,
                w,
                module.out_channels,
                module.kernel_size[0],
                module.stride[0],
                module.padding[0],
            )
            seen[shape] = seen.get(shape, 0) + 1

        for m in model.blocks.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(record)
        model(torch.empty(2, 3, image, image))  # 2: BatchNorm refuses one value per channel
    return [Layer(i, shape, count) for i, (shape, count) in enumerate(seen.items())]
