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


def adder_layer_shapes(
    arch: str,
    batch: int,
    image: int = 224,
    channels: int | None = None,
    num_classes: int | None = None,
) -> list[Layer]:
    """The distinct adder layer shapes of the AdderNet ``arch`` (every adder layer: ResNet
    bodies and shortcuts, all of LeNet-5-BN's layers, its classifier included), in network
    order, with their counts. ``channels`` and ``num_classes`` default to the architecture's
    usual dataset (``models.INPUTS``).

    Traced on the meta device through the reference op: nothing is computed or allocated.
    """
    import torch

    from addertrain.models import INPUTS, adder_layers, create_model

    classes, _, usual_channels = INPUTS[arch]
    channels = channels or usual_channels
    seen: dict[tuple, int] = {}
    with torch.device("meta"):
        model = create_model(
            arch, num_classes=num_classes or classes, backend="reference", in_channels=channels
        )

        def record(module, inputs):
            _, c, h, w = inputs[0].shape
            k, s, p = module.kernel_size, module.stride, module.padding
            shape = (batch, c, h, w, module.out_channels, k, s, p)
            seen[shape] = seen.get(shape, 0) + 1

        for _, layer in adder_layers(model):
            layer.register_forward_pre_hook(record)
        # 2 images: BatchNorm refuses one value per channel
        model(torch.empty(2, channels, image, image))
    return [Layer(i, shape, count) for i, (shape, count) in enumerate(seen.items())]
