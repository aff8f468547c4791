"""The paper's ablation switches from the recipe to the gradients: `adder.grad`,
`adder.input_grad` and `adder.lr` reach every adder layer and the optimizer, bad values stop
the launch with exit code 2, and a short run trains with the ablated rules."""

import json
from pathlib import Path

import pytest
import torch

from addertrain import config
from addertrain.errors import UserError
from addertrain.model_io import create_model_from_config
from addertrain.models import adder_layers
from addertrain.nn import AdderConv2d
from conftest import cli
from test_bad_inputs import TINY, assert_user_error
from test_reference_op import assert_near, brute_force, random_case


def test_defaults_are_the_papers_method():
    a = config.from_dict({}).adder
    assert (a.lr, a.grad, a.input_grad) == ("alr", "full", "hardtanh")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("adder.grad=signed", "adder.grad: Input should be 'full' or 'sign'"),
        ("adder.input_grad=clip", "adder.input_grad: Input should be 'hardtanh', 'full' or 'sign'"),
        ("adder.lr=adaptive", "adder.lr: Input should be 'alr', 'fixed' or 'increased'"),
        ("adder.lr_increase=0", "adder.lr_increase: Input should be greater than 0"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(UserError, match=needle):
        config.from_dict(config.apply_overrides({}, [override]))


def test_alr_key_of_older_recipes_still_reads():
    assert config.from_dict({"adder": {"alr": False}}).adder.lr == "fixed"
    # an override of lr wins over the recipe's alr
    assert config.from_dict({"adder": {"alr": True, "lr": "fixed"}}).adder.lr == "fixed"
    with pytest.raises(UserError, match="adder.alr must be true or false"):
        config.from_dict({"adder": {"alr": "yes"}})


def test_rules_reach_every_adder_layer():
    cfg = config.from_dict(
        config.apply_overrides(
            {}, ["adder.grad=sign", "adder.input_grad=full", "model.arch=resnet20"]
        )
    )
    layers = adder_layers(create_model_from_config(cfg))
    assert layers and all((m.grad, m.input_grad) == ("sign", "full") for _, m in layers)


def test_unfold_backend_refuses_the_ablation_rules():
    with pytest.raises(UserError, match="unfold backend is the official release's formulation"):
        AdderConv2d(2, 3, 3, backend="unfold", grad="sign")
    with pytest.raises(UserError, match="adder input gradient 'clip' is unknown"):
        AdderConv2d(2, 3, 3, input_grad="clip")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("grad,input_grad", [("sign", "hardtanh"), ("full", "sign")])
def test_autograd_applies_the_rules(backend, grad, input_grad):
    """float64 through the reference op (fp32 through the kernels, which have no fp64)."""
    x, w, g = random_case(3, 2, 1, seed=11)
    dtype, rtol = (torch.float64, 1e-12) if backend == "reference" else (torch.float32, 2e-5)
    layer = AdderConv2d(w.shape[1], w.shape[0], 3, 2, 1, backend, grad, input_grad).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
    x = x.to(dtype).requires_grad_(True)
    (layer(x) * g.to(dtype)).sum().backward()
    _, dx, dw = brute_force(x.detach(), w, g, 2, 1, grad, input_grad)
    assert_near(x.grad, dx, rtol, "input gradient")
    assert_near(layer.weight.grad, dw, rtol, "weight gradient")


def test_launch_refuses_a_bad_rule():
    assert_user_error(cli("launch", *TINY, "adder.grad=signum"), "adder.grad", "'full' or 'sign'")


def test_a_short_run_trains_with_the_ablated_rules(tmp_path):
    """Sign gradients everywhere and the increased learning rate: the run finishes, its
    saved recipe names the rules, and the loss is finite."""
    out = cli(
        "launch",
        *TINY,
        f"run.dir={tmp_path}",
        "run.name=ablated",
        "adder.grad=sign",
        "adder.input_grad=sign",
        "adder.lr=increased",
        "adder.lr_increase=10",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = Path(tmp_path) / "ablated"
    saved = config.load(run / "config.yaml").adder
    assert (saved.grad, saved.input_grad, saved.lr, saved.lr_increase) == (
        "sign",
        "sign",
        "increased",
        10.0,
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
