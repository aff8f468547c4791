"""LeNet-5-BN, the AdderNet paper's MNIST network, with adder or ordinary convolutions.

LeNet-5 (LeCun et al., 1998) on a 32x32 gray image: C1 5x5x6, max pool, C3 5x5x16, max pool,
C5 5x5x120 (a 1x1 output: a fully connected layer written as a convolution), F6 120->84,
then the classifier; "-BN" puts BatchNorm after every layer. The AdderNet paper (section
4.1) replaces every layer's multiplications, the fully connected ones included, so in
the adder model even C1 and the classifier are adder layers; its count of about 435K
multiplications for the CNN fits one input channel at 32x32 (3 channels would be ~650K).
"""

from __future__ import annotations

from functools import partial

from torch import nn

from addertrain.models.resnet import conv_factory
from addertrain.nn import BatchNorm2d

IMAGE_SIZE = 32  # C5's 5x5 window covers exactly the 5x5 map that a 32x32 input leaves


class LeNet5(nn.Module):
    def __init__(self, conv, bn, num_classes: int, in_channels: int, head: str, bn_momentum: float):
        super().__init__()

        def unit(cin, cout, k):
            return [conv(cin, cout, k), bn(cout), nn.ReLU(inplace=True)]

        # "blocks", as in the ResNets: the layers whose shapes the Triton warm-up traces
        self.blocks = nn.Sequential(
            *unit(in_channels, 6, 5),
            nn.MaxPool2d(2),
            *unit(6, 16, 5),
            nn.MaxPool2d(2),
            *unit(16, 120, 5),
            *unit(120, 84, 1),
        )
        if head == "bn":
            self.fc = conv(84, num_classes, 1)
            self.bn = BatchNorm2d(num_classes, momentum=bn_momentum)
        else:
            self.fc, self.bn = nn.Linear(84, num_classes), None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"LeNet-5 takes {IMAGE_SIZE}x{IMAGE_SIZE} images, got "
                f"{tuple(x.shape[-2:])}; set data.image_size={IMAGE_SIZE}"
            )
        x = self.blocks(x)
        if self.bn is None:
            return self.fc(x.flatten(1))
        return self.bn(self.fc(x)).flatten(1)


def create_lenet(
    conv: str,
    num_classes: int,
    head: str,
    backend: str,
    bn_momentum: float,
    in_channels: int,
    **rules,
) -> LeNet5:
    """LeNet-5-BN; the arguments are ``models.create_model``'s."""
    if head == "auto":
        head = "bn" if conv == "adder" else "linear"
    return LeNet5(
        conv_factory(conv, backend, **rules),
        partial(BatchNorm2d, momentum=bn_momentum),
        num_classes,
        in_channels,
        head,
        bn_momentum,
    )
