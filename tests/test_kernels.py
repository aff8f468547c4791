"""The Triton adder kernels against a float64 evaluation of the paper's definitions.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest) with one small
tile config, so the shapes below leave tails in every tiled dimension. With a GPU the same
tests run on CUDA, plus the ``gpu`` tests: every ResNet-18/50 layer shape, every autotune
config, and the memory bound.

Tolerances are relative to the magnitude of the sum being computed (sum of |terms|), since
both gradients are sums of signed terms: fp32 2e-5 (fp32 accumulation over <= a few thousand
terms), fp16 2e-3 (an fp16 output is rounded to 2**-11, the GEMM term of the weight gradient
too), bf16 1.6e-2 (rounding to 2**-8, twice for the weight gradient).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from addertrain import kernels
from addertrain.nn import AdderConv2d
from test_reference_op import INPUT_RULES, WEIGHT_RULES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (N, C, H, W, O, k, stride, padding). The interpreter tile is 16 pixels x 64 channels with
# 2-channel reduction steps: odd C / O and pixel counts that are not multiples of 16 leave
# tails, every case has several pixel tiles, and the 1x1-s1 case has two channel tiles for
# both kernels (forward tiles O, grad_input tiles C).
CASES = {
    "3x3-s1-p1": (2, 3, 7, 6, 5, 3, 1, 1),
    "3x3-s2-p1-batch1": (1, 4, 9, 9, 9, 3, 2, 1),
    "3x3-s2-p0": (1, 2, 8, 7, 3, 3, 2, 0),
    "1x1-s1-p0-wide": (2, 67, 4, 5, 66, 1, 1, 0),
    "1x1-s2-p0-odd": (2, 6, 7, 5, 10, 1, 2, 0),
    "7x7-s2-p3": (1, 3, 11, 10, 4, 7, 2, 3),
}


def definition(x, w, g, stride, padding, grad="full", input_grad="hardtanh"):
    """float64 brute force, one kernel tap at a time, straight from the paper's formulas
    (the backward with the given rules, tests/test_reference_op.py).

    Returns (y, |y|), (gx, scale), (gw, scale) where scale bounds the sum of |terms|.
    """
    x, w, g = x.double(), w.double(), g.double()
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = g.shape[2:]
    xp = F.pad(x, (padding,) * 4)  # zero padding enters as x = 0
    y = torch.zeros_like(g)
    gxp, gxp_scale = torch.zeros_like(xp), torch.zeros_like(xp)
    gw, gw_scale = torch.zeros_like(w), torch.zeros_like(w)
    for r in range(k):
        for s in range(k):
            rows = slice(r, r + stride * (oh - 1) + 1, stride)
            cols = slice(s, s + stride * (ow - 1) + 1, stride)
            xs = xp[:, :, rows, cols]  # the input pixel that output (oh, ow) reads at tap (r, s)
            for o0 in range(0, o, 64):  # bounds the [N, o, C, OH, OW] temporaries on a GPU
                osl = slice(o0, o0 + 64)
                d = xs[:, None] - w[None, osl, :, r, s, None, None]
                gs = g[:, osl, None]
                y[:, osl] -= d.abs().sum(2)
                # |x| + |w| bounds a full-precision term, 1 a clipped or sign one
                size = xs.abs()[:, None] + w[None, osl, :, r, s, None, None].abs()
                gxp[:, :, rows, cols] += (gs * INPUT_RULES[input_grad](d)).sum(1)
                gxp_scale[:, :, rows, cols] += (
                    (gs.abs() * (size if input_grad == "full" else 1)).sum(1).expand(-1, c, -1, -1)
                )
                gw[osl, :, r, s] += (gs * WEIGHT_RULES[grad](d)).sum((0, 3, 4))
                gw_scale[osl, :, r, s] += (
                    (gs.abs() * (size if grad == "full" else 1)).expand_as(d).sum((0, 3, 4))
                )
    inner = (slice(None), slice(None), slice(padding, padding + h), slice(padding, padding + wd))
    return (y, y.abs()), (gxp[inner], gxp_scale[inner]), (gw, gw_scale)


def assert_close(got, expected, dtype, what):
    value, scale = expected
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert not got.isnan().any(), f"{what}: NaN left, an output element was not written"
    err = (got.double() - value).abs()
    bound = RTOL[dtype] * scale + 1e-6
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{what}: error {err.flatten()[worst]:.3g} > bound "
        f"{bound.flatten()[worst]:.3g} at flat index {worst}"
    )


def make(case, dtype=torch.float32, channels_last=False, seed=0):
    n, c, h, wd, o, k, stride, padding = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, wd, generator=gen).to(DEVICE, dtype)
    w = torch.randn(o, c, k, k, generator=gen).to(DEVICE, dtype)
    oh = (h + 2 * padding - k) // stride + 1
    ow = (wd + 2 * padding - k) // stride + 1
    g = torch.randn(n, o, oh, ow, generator=gen).to(DEVICE, dtype)
    if channels_last:
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    return x, w, g, stride, padding


def poisoned(like, shape=None):
    """A NaN-filled buffer with ``like``'s layout: an element the kernel skips stays NaN."""
    shape = like.shape if shape is None else shape
    fmt = (
        torch.channels_last
        if (
            like.dim() == 4
            and not like.is_contiguous()
            and like.is_contiguous(memory_format=torch.channels_last)
        )
        else torch.contiguous_format
    )
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device).contiguous(
        memory_format=fmt
    )


def check_all(x, w, g, stride, padding, dtype):
    y_def, gx_def, gw_def = definition(x, w, g, stride, padding)
    y = kernels.forward(x, w, stride, padding, out=poisoned(x, g.shape))
    assert_close(y, y_def, dtype, "forward")
    gx = kernels.grad_input(g, x, w, stride, padding, out=poisoned(x))
    assert_close(gx, gx_def, dtype, "grad_input")
    gw = kernels.grad_weight(g, x, w, stride, padding, out=poisoned(w))
    assert_close(gw, gw_def, dtype, "grad_weight")


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_nchw(name):
    x, w, g, stride, padding = make(CASES[name])
    check_all(x, w, g, stride, padding, torch.float32)


@pytest.mark.parametrize("name", ["3x3-s2-p1-batch1", "1x1-s2-p0-odd"])
def test_channels_last(name):
    x, w, g, stride, padding = make(CASES[name], channels_last=True)
    check_all(x, w, g, stride, padding, torch.float32)
    y = kernels.forward(x, w, stride, padding)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert kernels.grad_input(g, x, w, stride, padding).is_contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["3x3-s1-p1", "1x1-s2-p0-odd"])
def test_half_precision(name, dtype):
    x, w, g, stride, padding = make(CASES[name], dtype)
    check_all(x, w, g, stride, padding, dtype)


@pytest.mark.parametrize("grad,input_grad", [("sign", "full"), ("full", "sign")])
@pytest.mark.parametrize(
    "name,channels_last", [("3x3-s2-p1-batch1", False), ("1x1-s2-p0-odd", True)]
)
def test_ablation_rules(name, channels_last, grad, input_grad):
    """The sign weight-gradient kernel and grad_input's unclipped and sign rules."""
    x, w, g, stride, padding = make(CASES[name], channels_last=channels_last, seed=3)
    _, gx_def, gw_def = definition(x, w, g, stride, padding, grad, input_grad)
    gx = kernels.grad_input(g, x, w, stride, padding, input_grad, out=poisoned(x))
    assert_close(gx, gx_def, torch.float32, f"grad_input {input_grad}")
    gw = kernels.grad_weight(g, x, w, stride, padding, grad, out=poisoned(w))
    assert_close(gw, gw_def, torch.float32, f"grad_weight {grad}")


def test_mixed_dtypes_follow_their_tensor():
    """bf16 activations with fp32 master weights: y and gx in bf16, gw in fp32."""
    x, w, g, stride, padding = make(CASES["3x3-s1-p1"], torch.bfloat16)
    w = w.float()
    y_def, gx_def, gw_def = definition(x, w, g, stride, padding)
    assert_close(kernels.forward(x, w, stride, padding), y_def, torch.bfloat16, "forward")
    assert_close(kernels.grad_input(g, x, w, stride, padding), gx_def, torch.bfloat16, "grad_input")
    # the GEMM term is still computed (and rounded) in bf16
    gw = kernels.grad_weight(g, x, w, stride, padding)
    assert gw.dtype == torch.float32
    err = (gw.double() - gw_def[0]).abs()
    assert (err <= RTOL[torch.bfloat16] * gw_def[1] + 1e-6).all()


def test_grad_input_is_deterministic():
    x, w, g, stride, padding = make(CASES["3x3-s2-p1-batch1"], seed=1)
    first = kernels.grad_input(g, x, w, stride, padding)
    assert torch.equal(first, kernels.grad_input(g, x, w, stride, padding))


def test_adder_conv2d_triton_backend_through_autograd():
    x, w, g, stride, padding = make(CASES["3x3-s2-p1-batch1"], seed=2)
    layer = AdderConv2d(w.shape[1], w.shape[0], w.shape[2], stride, padding, backend="triton").to(
        DEVICE
    )
    with torch.no_grad():
        layer.weight.copy_(w)
    x.requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    y_def, gx_def, gw_def = definition(x.detach(), w, g, stride, padding)
    assert_close(y.detach(), y_def, torch.float32, "forward")
    assert_close(x.grad, gx_def, torch.float32, "x.grad")
    assert_close(layer.weight.grad, gw_def, torch.float32, "weight.grad")


def test_bad_arguments_are_rejected():
    x, w, g, stride, padding = make(CASES["3x3-s1-p1"])
    with pytest.raises(ValueError, match="out must be"):
        kernels.forward(x, w, stride, padding, out=torch.empty(1, device=DEVICE))
    with pytest.raises(ValueError, match="channels"):
        kernels.forward(x, w[:, :2], stride, padding)
    with pytest.raises(ValueError, match="square"):
        kernels.forward(x, w[:, :, :2], stride, padding)
    with pytest.raises(ValueError, match="g must be"):
        kernels.grad_input(g[:, :2], x, w, stride, padding)


def test_triton_backend_without_gpu_or_interpreter_is_a_user_error():
    """Run where TRITON_INTERPRET is unset: CPU tensors then cannot reach a Triton kernel."""
    script = (
        "import torch\n"
        "from addertrain.errors import UserError\n"
        "from addertrain.nn import AdderConv2d\n"
        "from addertrain import kernels\n"
        "x = torch.randn(1, 2, 5, 5)\n"
        "for call in (lambda: AdderConv2d(2, 3, 3, backend='triton')(x),\n"
        "             lambda: kernels.forward(x, torch.randn(3, 2, 3, 3), 1, 1)):\n"
        "    try:\n"
        "        call()\n"
        "    except UserError as e:\n"
        "        print('USERERROR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("USERERROR")]
    assert len(lines) == 2, done.stdout + done.stderr
    assert all("TRITON_INTERPRET=1" in line and "CUDA" in line for line in lines), lines


def test_grad_weight_by_slices_matches_the_definition(monkeypatch):
    """The GEMM term computed on batch and output-channel slices (as on large fp32 3x3 layers)."""
    from addertrain.kernels import wgrad

    x, w, g, stride, padding = make(CASES["3x3-s1-p1"], seed=3)
    monkeypatch.setattr(wgrad, "gemm_splits", lambda *args: (2, 3))
    gw = kernels.grad_weight(g, x, w, stride, padding, out=poisoned(w))
    assert_close(
        gw, definition(x, w, g, stride, padding)[2], torch.float32, "grad_weight by slices"
    )


def test_gemm_splits_bound_the_winograd_workspace():
    """Run 1 (H200): only fp32 3x3 stride-1 layers paid cuDNN's Winograd workspace; there the
    slices keep its estimate within x + g + w, elsewhere the term stays one call."""
    from addertrain.kernels.wgrad import MAX_CALLS, _winograd_bytes, gemm_splits

    def tensors(n, c, h, o, k, stride, dtype=torch.float32):
        oh = (h + 2 * (k // 2) - k) // stride + 1
        return (
            torch.empty(n, c, h, h, device="meta", dtype=dtype),
            torch.empty(n, o, oh, oh, device="meta", dtype=dtype),
            torch.empty(o, c, k, k, device="meta", dtype=dtype),
        )

    for n, c, h, o in [(64, 64, 56, 64), (64, 128, 28, 128), (64, 256, 14, 256), (64, 512, 7, 512)]:
        x, g, w = tensors(n, c, h, o, 3, 1)
        b, q = gemm_splits(x, g, w, 1)
        assert 1 < b * q <= MAX_CALLS
        assert _winograd_bytes(-(-n // b), c, -(-o // q), h, h) <= 4 * (
            x.numel() + g.numel() + w.numel()
        )
    assert gemm_splits(*tensors(64, 64, 56, 64, 3, 1, torch.bfloat16), 1) == (1, 1)
    assert gemm_splits(*tensors(64, 128, 56, 128, 3, 2), 2) == (1, 1)
    assert gemm_splits(*tensors(64, 256, 56, 64, 1, 1), 1) == (1, 1)


# --- CUDA only ---------------------------------------------------------------------------


def resnet_layer_shapes(arch):
    from addertrain.models.shapes import adder_layer_shapes

    return [layer.shape for layer in adder_layer_shapes(arch, batch=2)]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_every_resnet_layer_shape(arch):
    for i, (n, c, h, wd, o, k, stride, padding) in enumerate(resnet_layer_shapes(arch)):
        x, w, g, stride, padding = make((n, c, h, wd, o, k, stride, padding), seed=i)
        # post-ReLU-like activations and N(0,1) weights, as in training
        x = x.relu()
        check_all(x, w, g, stride, padding, torch.float32)


@contextmanager
def only_config(autotuned, config):
    saved = autotuned.configs
    autotuned.configs = [config]
    try:
        yield
    finally:
        autotuned.configs = saved


@pytest.mark.gpu
def test_every_autotune_config():
    from addertrain.kernels import dgrad, fprop

    shapes = [(3, 37, 9, 11, 70, 3, 2, 1), (2, 64, 7, 7, 200, 1, 1, 0)]
    for kernel in (fprop._forward_kernel, dgrad._grad_input_kernel):
        for config in list(kernel.configs):
            with only_config(kernel, config):
                for case in shapes:
                    x, w, g, stride, padding = make(case)
                    y_def, gx_def, _ = definition(x, w, g, stride, padding)
                    if kernel is fprop._forward_kernel:
                        got = kernels.forward(x, w, stride, padding, out=poisoned(x, g.shape))
                        assert_close(got, y_def, torch.float32, f"forward {config}")
                    else:
                        got = kernels.grad_input(g, x, w, stride, padding, out=poisoned(x))
                        assert_close(got, gx_def, torch.float32, f"grad_input {config}")


@pytest.mark.gpu
def test_no_unfolded_temporaries():
    """Extra memory is the weight tables and cuDNN's workspace, never O(N*K*L)."""
    x, w, g, stride, padding = make((16, 64, 56, 56, 64, 3, 1, 1))
    kernels.forward(x, w, stride, padding)  # autotune and compile outside the measurement
    kernels.grad_input(g, x, w, stride, padding)
    unfolded = x.numel() * 9 * x.element_size()
    for name, call in [
        ("forward", lambda: kernels.forward(x, w, stride, padding)),
        ("grad_input", lambda: kernels.grad_input(g, x, w, stride, padding)),
    ]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = call()
        extra = torch.cuda.max_memory_allocated() - base - result.numel() * result.element_size()
        assert extra < unfolded / 50, f"{name} used {extra} bytes beyond its output"


# --- autotuning, benchmark and compiler report plumbing ------------------------------------


def test_column_waste_pruner_keeps_tiles_that_fit():
    import triton

    from addertrain.kernels.common import column_waste_pruner

    wide, narrow = (
        triton.Config(dict(TM=8, TN=16, GM=16, GN=8, BK=2)),
        triton.Config(dict(TM=8, TN=16, GM=32, GN=4, BK=2)),
    )
    prune = column_waste_pruner("O")
    assert prune([wide, narrow], {"O": 64}) == [narrow]  # 128-wide tile: half idle
    assert prune([wide, narrow], {"O": 512}) == [wide, narrow]
    assert prune([wide, narrow], {"O": 5}) == [narrow]  # least waste when all waste


@pytest.mark.slow
def test_bench_quick_writes_table_and_json(tmp_path, capsys):
    from addertrain.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "kernels", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert result["ceiling"]["elements_per_s"] > 0
    assert len(result["layers"]) == 2
    for row in result["layers"]:
        assert row["name"] in table
        for op in ("forward", "grad_input", "grad_weight"):
            o = row["ops"][op]
            assert o["triton_ms"] > 0 and o["conv_ms"] > 0
            assert o["fraction_of_ceiling"] == pytest.approx(
                o["elements_per_s"] / result["ceiling"]["elements_per_s"]
            )
            assert o["elements_per_s"] == pytest.approx(row["elements"] / (o["triton_ms"] * 1e-3))
            assert o["triton_over_conv"] == pytest.approx(o["triton_ms"] / o["conv_ms"])
            assert o["unfold_over_triton"] == pytest.approx(o["unfold_ms"] / o["triton_ms"])
        assert row["layer"]["unfold_over_triton"] == pytest.approx(
            row["layer"]["unfold_ms"] / row["layer"]["triton_ms"]
        )
    net = result["network"]
    for name in ("triton", "reference", "cnn"):
        assert net[name]["img_per_s"] > 0, net
    assert net["triton_over_cnn"] == pytest.approx(
        net["triton"]["img_per_s"] / net["cnn"]["img_per_s"]
    )
    assert (
        result["summary"]["forward_3x3_fraction_min"]
        == result["layers"][0]["ops"]["forward"]["fraction_of_ceiling"]
    )


def test_bench_rejects_unknown_layers(capsys):
    from addertrain.cli import main

    assert main(["bench", "kernels", "--quick", "--layers", "7"]) == 2
    assert "--layers" in capsys.readouterr().err


def test_compiler_report_reads_the_ceiling_kernels_hot_loop():
    """Ahead-of-time compile for sm_90 (no GPU needed): the add-bound loop is all FP32 adds."""
    script = (
        "import json, triton\n"
        "from addertrain.kernels import ceiling, report\n"
        "config = triton.Config(dict(ROWS=ceiling.ROWS, BLOCK=256, UNROLL=ceiling.UNROLL),"
        " num_warps=8)\n"
        "print(json.dumps(report.config_report(ceiling._add_bound_kernel, config, {})))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    from addertrain.kernels import ceiling

    r = json.loads(done.stdout.strip().splitlines()[-1])
    # 256 threads for a 256-wide block: each thread adds ROWS x UNROLL elements per iteration
    assert r["loop_top_ops"]["FADD"] >= 2 * ceiling.ROWS * ceiling.UNROLL
    assert r["loop_fp32_fraction"] > 0.95 and r["loop_loads"] == 0 and r["loop_spill_ops"] == 0


def test_adder_kernels_hot_loops_stay_in_registers():
    """No shared-memory layout conversions, barriers or spills in either Triton kernel's hot
    loop (run 1's grad_input had 194 shared-memory ops and 8 barriers per step there; the
    compiler on the GPU machine, Triton 3.6, is the one that produced them)."""
    script = (
        "import json\n"
        "from addertrain.kernels import dgrad, fprop, report\n"
        "for kernel in (fprop._forward_kernel, dgrad._grad_input_kernel):\n"
        "    config = kernel.configs[0]\n"
        "    print(json.dumps(report.config_report(kernel.fn, config,"
        " dict(KH=3, STRIDE=1, PAD=1))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    for line in done.stdout.strip().splitlines()[-2:]:
        r = json.loads(line)
        assert r["loop_shared_ops"] == 0 and r["loop_spill_ops"] == 0, r
        # two FP32 instructions per adder element dominate the loop
        assert r["loop_fp32_fraction"] > 0.7, r
