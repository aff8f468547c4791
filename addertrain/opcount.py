"""``addertrain ops``: the multiplications and additions of one forward pass, and their energy,
for an AdderNet and its CNN twin, per layer and in total.

Counting conventions (the AdderNet paper's tables, Chen et al., CVPR 2020, arXiv 1912.13200):

- A convolution or fully connected layer costs one multiplication and one addition per
  multiply-accumulate (MAC), ``fan-in = C_in * kh * kw`` MACs per output element.
- An adder layer costs two additions per term of its sum: ``|x - w|`` is a subtraction (the
  absolute value only clears a sign bit), and accumulating it is an addition. An AdderNet thus
  performs as many operations as its CNN twin, the multiplications of its adder layers having
  become additions (the authors' own statement, huawei-noah/AdderNet issue #38).
- The ResNets' stem convolution and classifier keep their multiplications in the AdderNet, as
  in the paper and its release (huawei-noah/AdderNet issue #60); LeNet-5-BN's AdderNet has
  none (section 4.1). The table says which layers multiply.
- BatchNorm, ReLU, pooling and the residual additions are not counted: the paper leaves them
  out as much cheaper than the convolutions.

Energy: arithmetic only (no memory traffic, which dominates real hardware), with the 45 nm
FP32 energies of M. Horowitz, "Computing's energy problem (and what we can do about it)",
ISSCC 2014: 0.9 pJ per addition, 3.7 pJ per multiplication.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from addertrain.errors import UserError

HELP = (
    "multiplications, additions and energy (45 nm FP32, Horowitz ISSCC 2014) of one forward "
    "pass: an AdderNet and its CNN twin, per layer and in total"
)

ADD_PJ, MUL_PJ = 0.9, 3.7
MIN_IMAGE_SIZE = 8  # the recipes' own lower bound (data.image_size)


@dataclass(frozen=True)
class Layer:
    """One multiplying or adding layer of a model, for one image."""

    name: str
    kind: str  # "adder", "conv" or "linear"
    output: tuple[int, ...]  # per image: (C, H, W) or (features,)
    fan_in: int

    @property
    def macs(self) -> int:
        n = 1
        for d in self.output:
            n *= d
        return n * self.fan_in

    @property
    def mul(self) -> int:
        return 0 if self.kind == "adder" else self.macs

    @property
    def add(self) -> int:
        return 2 * self.macs if self.kind == "adder" else self.macs


@dataclass(frozen=True)
class Cost:
    mul: int
    add: int

    @property
    def energy_pj(self) -> float:
        return self.mul * MUL_PJ + self.add * ADD_PJ


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    num_classes: int
    image_size: int
    channels: int


def layers(spec: ModelSpec, conv: str) -> list[Layer]:
    """The counted layers of ``spec`` built with ``conv`` ("adder" or "conv"), in forward order,
    from one forward pass on the meta device (shapes only: nothing is allocated or computed)."""
    import torch
    from torch import nn

    from addertrain.models import create_model
    from addertrain.nn import AdderConv2d

    with torch.device("meta"):
        model = create_model(spec.arch, conv, spec.num_classes, in_channels=spec.channels).eval()
    names = {m: name for name, m in model.named_modules()}
    found: list[Layer] = []

    def record(module, _inputs, output):
        if isinstance(module, AdderConv2d):
            kind, fan_in = "adder", module.in_channels * module.kernel_size**2
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            kind, fan_in = "conv", module.in_channels // module.groups * kh * kw
        else:
            kind, fan_in = "linear", module.in_features
        found.append(Layer(names[module], kind, tuple(output.shape[1:]), fan_in))

    for m in model.modules():
        if isinstance(m, (AdderConv2d, nn.Conv2d, nn.Linear)):
            m.register_forward_hook(record)
    with torch.no_grad():
        model(torch.empty(1, spec.channels, spec.image_size, spec.image_size, device="meta"))
    return found


def total(found: list[Layer]) -> Cost:
    return Cost(sum(layer.mul for layer in found), sum(layer.add for layer in found))


def cost(spec: ModelSpec, conv: str) -> Cost:
    return total(layers(spec, conv))


UNITS = ((1e9, "G"), (1e6, "M"), (1e3, "K"))


def human(n: float, digits: int = 2, like: float | None = None) -> str:
    """``4.09G``, ``41.17M``, ``435.2K``: the paper's style of writing operation counts, in the
    unit that suits ``like`` (default ``n``): a table row shares one unit (0.1G / 3.5G)."""
    ref = abs(n if like is None else like)
    for div, unit in UNITS:
        if ref >= div:
            return f"{n / div:.{digits}f}{unit}"
    return f"{n:.0f}"


def energy(pj: float) -> str:
    for div, unit in ((1e9, "mJ"), (1e6, "uJ"), (1e3, "nJ")):
        if pj >= div:
            return f"{pj / div:.3g} {unit}"
    return f"{pj:.3g} pJ"


# -- the command ------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument(
        "target",
        metavar="RECIPE|ARCH",
        help="a recipe (its model.arch, model.num_classes, data.image_size and "
        "data.channels) or an architecture: resnet20, resnet32 (CIFAR), "
        "resnet18, resnet50 (ImageNet)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input height and width (default: the recipe's; for an architecture "
        "224 for the ImageNet ones, 32 for the CIFAR ones)",
    )
    p.add_argument(
        "--classes",
        type=int,
        default=None,
        help="classifier outputs (default: the recipe's; 1000 for the ImageNet "
        "architectures, 10 for the CIFAR ones)",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=None,
        help="input channels (default: the recipe's data.channels, else 3)",
    )


def resolve(
    target: str,
    image_size: int | None = None,
    classes: int | None = None,
    channels: int | None = None,
) -> ModelSpec:
    """The model a recipe path or an architecture name stands for, with the overrides."""
    from addertrain.models import ARCHS, INPUTS

    if target in ARCHS:
        spec = ModelSpec(target, *INPUTS[target])
    elif Path(target).suffix in (".yaml", ".yml") or Path(target).exists():
        from addertrain import config

        cfg = config.load(target)
        spec = ModelSpec(
            cfg.model.arch, cfg.model.num_classes, cfg.data.image_size, cfg.data.channels
        )
    else:
        raise UserError(
            f"{target!r} is neither a recipe file nor an architecture; pass a YAML "
            f"recipe such as recipes/resnet50_imagenet.yaml or one of {', '.join(ARCHS)}"
        )
    for flag, value, least in (
        ("--image-size", image_size, MIN_IMAGE_SIZE),
        ("--classes", classes, 2),
        ("--channels", channels, 1),
    ):
        if value is not None and value < least:
            raise UserError(f"{flag} {value} is too small; use {least} or more")
    return ModelSpec(
        spec.arch,
        classes or spec.num_classes,
        image_size or spec.image_size,
        channels or spec.channels,
    )


def multiplying(adder: list[Layer]) -> str:
    """Which layers of the AdderNet still multiply, in words."""
    kept = [layer.name for layer in adder if layer.kind != "adder"]
    if not kept:
        return "every layer of this AdderNet is an adder layer"
    return f"the AdderNet keeps multiplications in {', '.join(kept)}"


def table(spec: ModelSpec) -> str:
    """Per layer and in total, the CNN twin's and the AdderNet's operations and energy."""
    adder, cnn = layers(spec, "adder"), layers(spec, "conv")
    rows = [
        ("layer", "AdderNet", "output", "fan-in", "CNN mul=add", "AdderNet mul", "AdderNet add")
    ]
    for a, c in zip(adder, cnn, strict=True):
        rows.append(
            (
                a.name,
                a.kind,
                "x".join(map(str, a.output)),
                str(a.fan_in),
                human(c.macs),
                human(a.mul),
                human(a.add),
            )
        )
    ta, tc = total(adder), total(cnn)
    rows.append(("total", "", "", "", human(tc.mul), human(ta.mul), human(ta.add)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"{spec.arch}: one {spec.channels}x{spec.image_size}x{spec.image_size} image, "
        f"{spec.num_classes} classes, forward pass"
    ]
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(
                v.ljust(w) if j < 3 else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths))
            )
        )
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        f"{'':9}{'#Mul':>10}{'#Add':>10}{'energy':>12}   (paper's rounding: #Mul / #Add)",
        f"{'CNN':9}{human(tc.mul):>10}{human(tc.add):>10}{energy(tc.energy_pj):>12}   "
        f"{human(tc.mul, 1, tc.add)} / {human(tc.add, 1)}",
        f"{'AdderNet':9}{human(ta.mul):>10}{human(ta.add):>10}{energy(ta.energy_pj):>12}   "
        f"{human(ta.mul, 1, ta.add)} / {human(ta.add, 1)}",
        f"AdderNet/CNN energy: {ta.energy_pj / tc.energy_pj:.2f} "
        f"({tc.energy_pj / ta.energy_pj:.1f}x less)",
        "",
        "Conventions: a conv/FC multiply-accumulate = 1 mul + 1 add; an adder term |x - w| = "
        f"2 adds (subtract, accumulate); {multiplying(adder)}; BatchNorm, ReLU, pooling and "
        "residual additions are not counted (as in the paper). Energy: arithmetic only, 45 nm "
        "FP32, add 0.9 pJ, mul 3.7 pJ (Horowitz, ISSCC 2014).",
    ]
    return "\n".join(lines)


def run(args) -> int:
    spec = resolve(args.target, args.image_size, args.classes, args.channels)
    print(table(spec))
    return 0
