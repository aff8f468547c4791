from functools import partial

from addertrain.config import ARCHS
from addertrain.models.lenet import create_lenet
from addertrain.models.resnet import adder_layers, create_resnet

# arch -> (classes, image size, channels) of the data it was built for (`addertrain ops` defaults)
INPUTS = {
    "resnet20": (10, 32, 3),
    "resnet32": (10, 32, 3),  # CIFAR
    "resnet18": (1000, 224, 3),
    "resnet50": (1000, 224, 3),  # ImageNet
    "lenet5": (10, 32, 1),  # MNIST, padded or resized to 32
}


def create_model(
    arch: str,
    conv: str = "adder",
    num_classes: int = 1000,
    head: str = "auto",
    backend: str = "auto",
    bn_momentum: float = 0.1,
    in_channels: int = 3,
    **rules,
):
    """Build ``arch`` with adder (the paper's AdderNet) or ordinary convolutions; ``rules``
    (``grad``, ``input_grad``) choose the adder layers' backward (AdderConv2d)."""
    build = create_lenet if arch == "lenet5" else partial(create_resnet, arch)
    return build(conv, num_classes, head, backend, bn_momentum, in_channels, **rules)


__all__ = ["ARCHS", "INPUTS", "adder_layers", "create_model"]
