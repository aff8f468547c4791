"""The adaptive learning rate against a hand computation, and its place in the SGD update."""

import math

import pytest
import torch

from addertrain.alr import AdderSGD, param_groups, scales
from addertrain.models import adder_layers, create_model


def test_scales_match_the_formula():
    sq = torch.tensor([4.0, 0.25, 0.0], dtype=torch.float64)
    numel = torch.tensor([9.0, 144.0, 10.0], dtype=torch.float64)
    got = scales(sq, numel, eta=0.2)
    # 0.2 * sqrt(9) / 2 = 0.3; 0.2 * 12 / 0.5 = 4.8; zero gradient keeps scale 1
    assert torch.allclose(got, torch.tensor([0.3, 4.8, 1.0], dtype=torch.float64))


def test_groups_one_per_adder_layer():
    model = create_model("resnet20")
    groups = param_groups(model, weight_decay=5e-4)
    layers = adder_layers(model)
    assert len(groups) == len(layers) + 1
    for g, (name, layer) in zip(groups, layers):
        assert g["params"] == [layer.weight] and g["alr_numel"] == layer.weight.numel()
        assert g["name"] == name
    assert groups[-1]["alr_numel"] == 0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_step_rescales_adder_gradients_only():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    layers = adder_layers(model)
    name, layer = layers[4]
    g = layer.weight.grad.clone()
    w0 = layer.weight.detach().clone()
    stem = model.stem[0].weight
    stem_g, stem_w0 = stem.grad.clone(), stem.detach().clone()

    lr, wd, eta = 0.1, 1e-3, 0.2
    opt = AdderSGD(param_groups(model, wd), lr=lr, momentum=0.9, eta=eta)
    opt.step()

    alpha = eta * math.sqrt(g.numel()) / g.norm().item()
    assert math.isclose(opt.last_scales[name], alpha, rel_tol=1e-5)
    # first momentum step: buf = grad; update = lr * (alpha * g + wd * w)
    assert torch.allclose(layer.weight, w0 - lr * (alpha * g + wd * w0), atol=1e-6)
    assert torch.allclose(stem, stem_w0 - lr * (stem_g + wd * stem_w0), atol=1e-7)


@pytest.mark.parametrize("mode,factor", [("fixed", 1.0), ("increased", 50.0)])
def test_fixed_and_increased_learning_rates(mode, factor):
    """The paper's ablations of the ALR: the plain schedule, or one constant for every adder
    layer; the other parameters are untouched either way."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    layers = [layer for _, layer in adder_layers(model)]
    stem = model.stem[0].weight
    params = [layers[0].weight, layers[-1].weight, stem]
    before = [(p.grad.clone(), p.detach().clone()) for p in params]
    opt = AdderSGD(param_groups(model, 0.0), lr=0.1, mode=mode, increase=50.0)
    opt.step()
    for p, scale, (g, w0) in zip(params, [factor, factor, 1.0], before):
        assert torch.allclose(p, w0 - 0.1 * scale * g)
    assert opt.last_scales == {}  # no adaptive scale to report


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="not one of alr, fixed, increased"):
        AdderSGD(param_groups(create_model("resnet20"), 0.0), lr=0.1, mode="adaptive")


# -- ZeRO 1/2: DeepSpeed calls the optimizer once per group; the ALR all-reduces once per step --


def _zero_rank(rank: int, store: str, out: str) -> None:
    """One of 2 ranks: a ZeRO 1 then a ZeRO 2 step on the same batch on both ranks (so the
    averaged gradient is exactly this batch's), through the project's engine setup."""
    import os

    import torch.distributed as dist

    from addertrain import config, engine

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    for zero in (1, 2):
        cfg = config.load(
            "recipes/synthetic_tiny.yaml",
            [f"distributed.zero_stage={zero}", "train.global_batch=8", "train.micro_batch=4"],
        )
        model, images, labels = _model_and_batch()
        opt = AdderSGD(param_groups(model, 1e-3), lr=0.1, momentum=0.9, eta=0.2, clip=0.5)
        ds = engine.initialize(cfg, model, opt, world_size=2)
        ds.backward(torch.nn.functional.cross_entropy(ds(images), labels))
        ds.step()
        results[zero] = {
            "summary": opt.summary(),
            "weights": {k: v.clone() for k, v in ds.module.state_dict().items()},
        }
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def _model_and_batch():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3)
    return model, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])


def test_zero_1_and_2_reduce_the_norms_once_per_step(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_zero_rank, args=(str(tmp_path / "store"), str(tmp_path / "out.pt")), nprocs=2)
    results = torch.load(tmp_path / "out.pt")
    # the same step by hand: one process, the whole gradient, plain AdderSGD
    model, images, labels = _model_and_batch()
    opt = AdderSGD(param_groups(model, 1e-3), lr=0.1, momentum=0.9, eta=0.2, clip=0.5)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    opt.step()
    expected = model.state_dict()
    groups = len(adder_layers(model)) + 1
    for zero, r in results.items():
        # one vector of every group's squared norm (20 adder layers + the clipped rest)
        assert r["summary"]["all_reduces"] == 1, (zero, r["summary"])
        assert r["summary"]["reduced_bytes"] == 4 * groups
        assert r["summary"]["clip"] < 1  # the clip acted, from the summed norm of the rest
        for k, v in expected.items():
            assert torch.allclose(r["weights"][k], v, rtol=1e-5, atol=1e-6), (zero, k)
