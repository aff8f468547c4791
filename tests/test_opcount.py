"""``addertrain ops``: the operation counts by hand on a tiny model, the paper's totals, the CLI."""

import pytest

from addertrain import opcount
from addertrain.cli import main

# ResNet-20, one 1x8x8 image, 4 classes: fan-in x output elements of every counted layer.
# stem 3x3 conv 1->16 at 8x8; stage 1: six 3x3 16->16 at 8x8; stage 2 (4x4): 16->32 stride 2,
# five 32->32, 1x1 shortcut 16->32; stage 3 (2x2): 32->64 stride 2, five 64->64, 1x1 shortcut
# 32->64; classifier 64->4.
STEM = 9 * 16 * 64
HEAD = 64 * 4
BODY = (
    6 * 144 * 16 * 64
    + 144 * 32 * 16
    + 5 * 288 * 32 * 16
    + 16 * 32 * 16
    + 288 * 64 * 4
    + 5 * 576 * 64 * 4
    + 32 * 64 * 4
)
TINY = opcount.ModelSpec("resnet20", num_classes=4, image_size=8, channels=1)


def test_tiny_resnet20_counts_match_the_hand_count():
    adder = {layer.name: layer for layer in opcount.layers(TINY, "adder")}
    cnn = opcount.layers(TINY, "conv")
    assert adder["stem.0"].kind == "conv" and adder["stem.0"].macs == STEM == 9216
    first = adder["blocks.0.conv1"]
    assert (first.kind, first.output, first.fan_in) == ("adder", (16, 8, 8), 144)
    assert (first.mul, first.add) == (0, 2 * 147456)
    shortcut = adder["blocks.3.downsample.0"]
    assert (shortcut.kind, shortcut.output, shortcut.macs) == ("adder", (32, 4, 4), 8192)
    assert adder["head.fc"].kind == "conv" and adder["head.fc"].macs == HEAD  # 1x1 conv + BN head
    assert cnn[-1].kind == "linear" and cnn[-1].macs == HEAD
    assert len(adder) == len(cnn) == 1 + 18 + 2 + 1

    assert opcount.total(cnn) == opcount.Cost(mul=STEM + BODY + HEAD, add=STEM + BODY + HEAD)
    assert STEM + BODY + HEAD == 2_532_608
    # the AdderNet: the stem and the classifier multiply; every adder term is two additions
    assert opcount.total(list(adder.values())) == opcount.Cost(mul=9472, add=9472 + 2 * BODY)


def test_energy_uses_the_45nm_fp32_figures():
    c = opcount.Cost(mul=10, add=100)
    assert c.energy_pj == pytest.approx(10 * 3.7 + 100 * 0.9)
    adder, cnn = opcount.cost(TINY, "adder"), opcount.cost(TINY, "conv")
    # same number of operations, additions instead of multiplications: 2.5x less energy
    assert adder.mul + adder.add == cnn.mul + cnn.add
    assert cnn.energy_pj / adder.energy_pj == pytest.approx(2.5, abs=0.05)


# The AdderNet paper (arXiv 1912.13200), ImageNet table, 224x224: #Mul and #Add, rounded to
# 0.1G as printed. See docs/watching.md for what the paper counts.
# Rounded as the paper prints them. Read from the paper's text: CNN ResNet-18's 1.8G; the rest
# follow from the counting conventions its authors state (docs/watching.md says what is unchecked).
PAPER = {
    ("resnet18", "conv"): (1.8, 1.8),
    ("resnet18", "adder"): (0.1, 3.5),
    ("resnet50", "conv"): (4.1, 4.1),
    ("resnet50", "adder"): (0.1, 8.1),
}


@pytest.mark.parametrize("arch,conv", list(PAPER))
def test_imagenet_totals_match_the_paper_to_its_rounding(arch, conv):
    c = opcount.cost(opcount.resolve(arch), conv)
    assert (round(c.mul / 1e9, 1), round(c.add / 1e9, 1)) == PAPER[arch, conv]


def test_ops_command_prints_layers_totals_and_energy(capsys):
    assert main(["ops", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "resnet18: one 3x224x224 image, 1000 classes" in out
    assert "blocks.7.conv2" in out and "head.fc" in out
    assert "1.8G / 1.8G" in out and "0.1G / 3.5G" in out and "Horowitz" in out
    assert "the AdderNet keeps multiplications in stem.0, head.fc;" in out


def test_lenet5_adder_net_multiplies_nowhere(capsys):
    # section 4.1: every layer of LeNet-5-BN, the classifier too, is an adder layer
    assert main(["ops", "recipes/mnist5k_lenet5.yaml"]) == 0
    out = capsys.readouterr().out
    assert "lenet5: one 1x32x32 image, 10 classes" in out
    assert "every layer of this AdderNet is an adder layer" in out and "keeps" not in out
    assert opcount.cost(opcount.resolve("recipes/mnist5k_lenet5.yaml"), "adder").mul == 0


def test_ops_reads_the_model_from_a_recipe(capsys):
    assert main(["ops", "recipes/synthetic_tiny.yaml", "--image-size", "8"]) == 0
    assert "resnet20: one 3x8x8 image, 4 classes" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,words",
    [
        (["ops", "resnet99"], "neither a recipe file nor an architecture"),
        (["ops", "missing.yaml"], "does not exist"),
        (["ops", "resnet18", "--image-size", "4"], "--image-size 4 is too small"),
        (["ops", "resnet18", "--classes", "1"], "--classes 1 is too small"),
    ],
)
def test_bad_ops_input_is_one_line_and_exit_2(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("addertrain: error:") and words in err and err.count("\n") == 1
