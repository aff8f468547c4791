"""The networks are built as in the paper, and the same code builds the CNN baselines."""

import pytest
import torch
from torch import nn

from addertrain.models import adder_layers, create_model
from addertrain.nn import AdderConv2d


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_cnn_resnet50_has_the_standard_parameter_count():
    assert _params(create_model("resnet50", conv="conv", head="linear")) == 25_557_032
    assert _params(create_model("resnet18", conv="conv", head="linear")) == 11_689_512


def test_adder_resnet50_head_differs_from_the_standard_one():
    # The paper's head: a bias-free 1x1 conv (2048*1000) + BatchNorm on the logits (2*1000),
    # where the standard head is Linear(2048, 1000) with bias: 1,000 parameters more in all.
    model = create_model("resnet50", conv="adder")
    assert _params(model) == 25_557_032 - 1000 + 2000
    assert isinstance(model.head.fc, nn.Conv2d) and model.head.fc.bias is None
    assert isinstance(model.head.bn, nn.BatchNorm2d)


@pytest.mark.parametrize(
    "arch, adders", [("resnet20", 20), ("resnet32", 32), ("resnet18", 19), ("resnet50", 52)]
)
def test_every_body_conv_is_an_adder_and_the_stem_multiplies(arch, adders):
    # resnet20: 18 block convs + 2 downsample shortcuts; resnet50: 48 + 4 shortcuts.
    model = create_model(arch, conv="adder", backend="reference")
    assert len(adder_layers(model)) == adders
    assert isinstance(model.stem[0], nn.Conv2d)
    for _, layer in adder_layers(model):
        assert layer.backend == "reference"
    cnn = create_model(arch, conv="conv")
    assert not adder_layers(cnn)
    assert sum(isinstance(m, nn.Conv2d) for m in cnn.modules()) == adders + 1 + (
        cnn.head.bn is not None
    )


def test_shortcuts_are_adder_plus_bn():
    model = create_model("resnet20")
    shortcut = model.blocks[3].downsample
    assert isinstance(shortcut[0], AdderConv2d) and shortcut[0].kernel_size == 1
    assert shortcut[0].stride == 2 and isinstance(shortcut[1], nn.BatchNorm2d)


def test_adder_weights_start_from_a_standard_normal():
    torch.manual_seed(0)
    w = torch.cat([m.weight.flatten() for _, m in adder_layers(create_model("resnet50"))])
    assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - 1) < 0.01


@pytest.mark.parametrize(
    "arch, size, classes",
    [("resnet20", 16, 10), ("resnet32", 12, 7), ("resnet18", 32, 5), ("resnet50", 32, 3)],
)
@pytest.mark.parametrize("conv", ["adder", "conv"])
def test_output_shapes(arch, size, classes, conv):
    model = create_model(arch, conv=conv, num_classes=classes, backend="reference")
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, classes) and torch.isfinite(out).all()


def test_one_channel_input():
    model = create_model("resnet20", num_classes=4, in_channels=1)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="resnet34"):
        create_model("resnet34")
