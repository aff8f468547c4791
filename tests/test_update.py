"""What a step computes is what the recipe says, checked against hand computations: the
update DeepSpeed's engine applies (ALR, clipping on or off), the learning rate of each step,
BatchNorm statistics under bf16 and across ranks."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from addertrain import config
from addertrain import engine as ds_engine
from addertrain.alr import AdderSGD, param_groups
from addertrain.errors import UserError
from addertrain.models import adder_layers, create_model
from addertrain.nn import BatchNorm2d, average_running_stats, reestimated
from addertrain.schedule import build_schedule


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank gloo group for in-process DeepSpeed engines (DeepSpeed keeps the group it
    first sees, so the module shares one), removed afterwards."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            env.setenv(key, value)
        store = dist.FileStore(str(tmp_path_factory.mktemp("group") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def recipe(*overrides):
    return config.from_dict(
        config.apply_overrides(
            {},
            [
                "model.num_classes=3",
                "train.global_batch=4",
                "train.micro_batch=4",
                "optim.momentum=0",
                "optim.weight_decay=0",
                *overrides,
            ],
        )
    )


def engine_step(cfg, model, images, labels, lr):
    """One optimizer step of ``model`` through the project's DeepSpeed engine."""
    o = cfg.optim
    opt = AdderSGD(
        param_groups(model, o.weight_decay),
        lr=lr,
        momentum=o.momentum,
        eta=cfg.adder.eta,
        mode=cfg.adder.lr,
        clip=o.grad_clip,
    )
    eng = ds_engine.initialize(cfg, model, opt, world_size=1)
    eng.backward(F.cross_entropy(eng(images), labels))
    eng.step()
    return eng.module


@pytest.mark.parametrize("clip", [None, 0.5])
def test_engine_update_matches_a_hand_computation(one_rank_group, clip):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    # the gradient by plain autograd, on a copy in the same state
    twin = copy.deepcopy(model)
    F.cross_entropy(twin(images), labels).backward()
    grads = {n: p.grad.clone() for n, p in twin.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adder = {f"{n}.weight" for n, _ in adder_layers(model)}
    rest_norm = math.sqrt(
        sum(g.double().pow(2).sum().item() for n, g in grads.items() if n not in adder)
    )
    # a gradient norm above 1 is what DeepSpeed's own default clipping would have cut
    assert math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values())) > 10

    lr, eta = 0.1, 0.2
    overrides = [f"adder.eta={eta}"] + ([f"optim.grad_clip={clip}"] if clip else [])
    trained = engine_step(recipe(*overrides), model, images, labels, lr)

    rest_factor = min(1.0, clip / (rest_norm + 1e-6)) if clip else 1.0
    if clip:
        assert rest_factor < 1  # the case must exercise the clip
    for name, p in trained.named_parameters():
        g = grads[name].double()
        if name in adder:  # the ALR: eta * sqrt(k) / ||g||, whatever the clip
            step = eta * math.sqrt(g.numel()) / g.norm().item() * g
        else:
            step = rest_factor * g
        expected = before[name].double() - lr * step
        assert torch.allclose(p.detach().double(), expected, rtol=1e-5, atol=1e-6), name


def test_deepspeed_config_never_leaves_clipping_to_its_default():
    ds = ds_engine.deepspeed_config(recipe(), 1)
    assert ds["gradient_clipping"] == 0.0
    assert ds_engine.deepspeed_config(recipe("optim.grad_clip=1.0"), 1)["gradient_clipping"] == 0.0


def test_bf16_accumulates_and_reduces_gradients_in_fp32():
    ds = ds_engine.deepspeed_config(recipe("train.precision=bf16", "distributed.zero_stage=1"), 1)
    assert ds["bf16"] == {"enabled": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"
    with pytest.raises(UserError, match="bf16 needs distributed.zero_stage=1"):
        recipe("train.precision=bf16")  # refused by the recipe's own validation


def test_bf16_batchnorm_statistics_track_a_shifted_mean():
    """As DeepSpeed leaves it under bf16: weights bf16, running statistics fp32; the adder
    layer hands it fp32 outputs near -1,012, where bf16's spacing is 8."""
    bn = BatchNorm2d(4, momentum=0.1)
    bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()
    bn.running_mean.fill_(-1000.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        y = bn(-1012.0 + torch.randn(8, 4, 3, 3, generator=gen))
    assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    assert torch.allclose(bn.running_mean, torch.full((4,), -1012.0), atol=0.1)


def test_batchnorm_in_fp32_is_torchs_batchnorm():
    torch.manual_seed(0)
    ours, theirs = BatchNorm2d(5, momentum=0.3), torch.nn.BatchNorm2d(5, momentum=0.3)
    x = torch.randn(6, 5, 4, 4) * 3 - 2
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 1


def test_schedule_gives_the_rate_of_each_step():
    cfg = config.ScheduleConfig(epochs=2, kind="cosine", warmup_epochs=1)
    lr_at = build_schedule(cfg, total_steps=16, steps_per_epoch=8, base_lr=0.1)
    # warmup over steps 0-7: (s + 1) / 8; then cosine over the remaining 8
    assert [lr_at(s) for s in (0, 7)] == pytest.approx([0.1 / 8, 0.1])
    assert lr_at(12) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_batchnorm_reestimation_is_the_mean_of_batch_statistics_and_undone_after():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1, bias=False), BatchNorm2d(3, momentum=0.3))
    bn = model[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(7.0)
    bn.num_batches_tracked.fill_(11)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    batches = [torch.randn(4, 2, 3, 3) * (i + 1) + i for i in range(3)]
    with torch.no_grad():
        features = [model[0](x).double() for x in batches]
    # by hand: per batch, the mean and the unbiased variance over (N, H, W); then their mean
    mean = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
    var = torch.stack([f.var((0, 2, 3), correction=1) for f in features]).mean(0)
    with reestimated(model, batches) as stats:
        assert not model.training
        assert torch.allclose(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(bn.running_var.double(), var, rtol=1e-5)
        assert stats.keys() == {"1.running_mean", "1.running_var"}
        assert torch.equal(stats["1.running_mean"], bn.running_mean)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert bn.momentum == 0.3 and not model.training
    with pytest.raises(RuntimeError), reestimated(model, batches):
        raise RuntimeError("an evaluation that fails leaves the statistics as they were too")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def _average_on_two_ranks(rank, path, out):
    dist.init_process_group("gloo", store=dist.FileStore(path, 2), rank=rank, world_size=2)
    torch.manual_seed(rank)
    model = create_model("resnet20", num_classes=3, bn_momentum=1.0)
    model(torch.randn(4, 3, 8, 8) + rank)  # each rank's statistics from its own batch
    before = [b.clone() for b in model.buffers()]
    average_running_stats(model)
    torch.save({"before": before, "after": list(model.buffers())}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_running_statistics_averaged_across_ranks(tmp_path):
    torch.multiprocessing.spawn(
        _average_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path / "bufs")), nprocs=2
    )
    r0, r1 = (torch.load(tmp_path / f"bufs.{r}") for r in (0, 1))
    names = [n for n, _ in create_model("resnet20", num_classes=3).named_buffers()]
    for i, name in enumerate(names):
        a0, a1 = r0["after"][i], r1["after"][i]
        assert torch.equal(a0, a1), name
        if "running" in name:
            assert not torch.equal(r0["before"][i], r1["before"][i]), name
            assert torch.allclose(a0, (r0["before"][i] + r1["before"][i]) / 2), name
        else:  # num_batches_tracked: the same count on every rank, left alone
            assert torch.equal(a0, r0["before"][i]), name
