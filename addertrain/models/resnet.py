"""ResNets built as in the AdderNet paper, or as ordinary CNNs with ``conv="conv"``.

Adder networks keep multiplication in the stem conv and the classifier; every
other conv (shortcuts included) is an adder layer followed by BatchNorm. The
paper's head is a bias-free 1x1 conv followed by BatchNorm on the logits: adder
outputs are large and negative, so the logits need normalising too.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from addertrain.nn import AdderConv2d, BatchNorm2d


def conv_factory(kind: str, backend: str, **rules):
    """A ``(in, out, kernel, stride, padding)`` constructor for the network's body convs;
    ``rules`` (grad, input_grad) go to the adder layers."""
    if kind == "adder":
        return lambda i, o, k, s=1, p=0: AdderConv2d(i, o, k, s, p, backend=backend, **rules)
    if kind == "conv":
        return lambda i, o, k, s=1, p=0: nn.Conv2d(i, o, k, s, p, bias=False)
    raise ValueError(f"conv kind {kind!r} is not adder or conv")


def shortcut(conv, bn, cin, cout, stride):
    """The 1x1 projection (conv of the body's kind + BN) where the shape changes, else None."""
    return (
        nn.Sequential(conv(cin, cout, 1, stride), bn(cout)) if stride != 1 or cin != cout else None
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, conv, bn, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = conv(cin, width, 3, stride, 1), bn(width)
        self.conv2, self.bn2 = conv(width, cout, 3, 1, 1), bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(conv, bn, cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, conv, bn, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        # stride on the 3x3 conv (ResNet v1.5), as torchvision and the official AdderNet do
        self.conv1, self.bn1 = conv(cin, width, 1), bn(width)
        self.conv2, self.bn2 = conv(width, width, 3, stride, 1), bn(width)
        self.conv3, self.bn3 = conv(width, cout, 1), bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(conv, bn, cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class Head(nn.Module):
    """Global average pool, then the classifier: linear, or 1x1 conv + BN on the logits."""

    def __init__(self, features, num_classes, kind, bn_momentum):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        if kind == "bn":
            self.fc = nn.Conv2d(features, num_classes, 1, bias=False)
            self.bn = BatchNorm2d(num_classes, momentum=bn_momentum)
        else:
            self.fc, self.bn = nn.Linear(features, num_classes), None

    def forward(self, x):
        x = self.pool(x)
        if self.bn is None:
            return self.fc(x.flatten(1))
        return self.bn(self.fc(x)).flatten(1)


class ResNet(nn.Module):
    def __init__(self, block, layers, widths, stem, num_classes, conv, bn, head, bn_momentum):
        super().__init__()
        self.stem = stem
        blocks, cin = [], widths[0]
        for i, (n, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            for j in range(n):
                blocks.append(block(conv, bn, cin, width, stride if j == 0 else 1))
                cin = width * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(cin, num_classes, head, bn_momentum)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


ARCHS = {
    # name: (block, blocks per stage, stage widths, imagenet stem)
    "resnet20": (BasicBlock, (3, 3, 3), (16, 32, 64), False),
    "resnet32": (BasicBlock, (5, 5, 5), (16, 32, 64), False),
    "resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), True),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), True),
}


def create_resnet(
    arch: str,
    conv: str,
    num_classes: int,
    head: str,
    backend: str,
    bn_momentum: float,
    in_channels: int,
    **rules,
) -> ResNet:
    """``arch`` of the table above; the arguments are ``models.create_model``'s."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")
    block, layers, widths, imagenet = ARCHS[arch]
    if head == "auto":
        head = "bn" if conv == "adder" else "linear"
    bn = partial(BatchNorm2d, momentum=bn_momentum)
    if imagenet:
        stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
            bn(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
    else:
        stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            bn(widths[0]),
            nn.ReLU(inplace=True),
        )
    return ResNet(
        block,
        layers,
        widths,
        stem,
        num_classes,
        conv_factory(conv, backend, **rules),
        bn,
        head,
        bn_momentum,
    )


def adder_layers(model: nn.Module) -> list[tuple[str, AdderConv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdderConv2d)]
