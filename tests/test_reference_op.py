"""The reference adder op and the official unfold formulation against the definition.

The expected values come from a float64 brute force written independently of both
backends: explicit loops over output pixels of a zero-padded input.
"""

import json
import math
import random
import shutil

import pytest
import torch

from addertrain.bench.op import peak_bytes
from addertrain.cli import main
from addertrain.models.shapes import adder_layer_shapes
from addertrain.nn import AdderConv2d
from addertrain.ops import native, reference, unfold

CPU = torch.device("cpu")
# kernel, stride, padding: every combination the models and the issue name
GEOMETRIES = [(k, s, p) for k in (1, 3, 7) for s in (1, 2) for p in (0, 1, 3)]
# Low-precision inputs are rounded to their dtype, then the op accumulates in fp32 and
# rounds its result once: the error is at most the dtype's unit roundoff (bf16 2^-8,
# fp16 2^-11) relative to the exact value, plus fp32 summation error.
LOW_PRECISION = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


# The backward rules as the paper writes them, on ``d = X - W``: the weight's gradient
# (full precision ``X - W``, or its sign) and the input's (HardTanh of ``W - X``, or
# ``W - X`` unclipped, or its sign). The first of each is the paper's method.
WEIGHT_RULES = {"full": lambda d: d, "sign": torch.sign}
INPUT_RULES = {
    "hardtanh": lambda d: (-d).clamp(-1, 1),
    "full": lambda d: -d,
    "sign": lambda d: (-d).sign(),
}


def brute_force(x, w, g, stride, padding, grad="full", input_grad="hardtanh"):
    """``(y, dX, dW)`` of the paper's definition, in float64, with the given rules."""
    x, w, g = x.double(), w.double(), g.double()
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = torch.zeros(n, c, h + 2 * padding, wd + 2 * padding, dtype=torch.float64)
    xp[:, :, padding : padding + h, padding : padding + wd] = x
    oh, ow = g.shape[2:]
    y = torch.empty(n, o, oh, ow, dtype=torch.float64)
    dxp, dw = torch.zeros_like(xp), torch.zeros_like(w)
    for i in range(oh):
        for j in range(ow):
            top, left = i * stride, j * stride
            patch = xp[:, :, top : top + kh, left : left + kw]  # n, c, kh, kw
            diff = patch[:, None] - w[None]  # n, o, c, kh, kw
            y[:, :, i, j] = -diff.abs().sum((2, 3, 4))
            gij = g[:, :, i, j][:, :, None, None, None]
            dw += (gij * WEIGHT_RULES[grad](diff)).sum(0)
            dxp[:, :, top : top + kh, left : left + kw] += (
                gij * INPUT_RULES[input_grad](diff)
            ).sum(1)
    return y, dxp[:, :, padding : padding + h, padding : padding + wd], dw


def random_case(kernel, stride, padding, seed, channels=None):
    """Random odd-ish sizes, batch 1 among them, with post-ReLU inputs and N(0,1) weights."""
    rng = random.Random(seed)
    n, c, o = rng.choice((1, 2, 3)), channels or rng.randint(1, 5), rng.randint(1, 6)
    h = rng.randint(max(1, kernel - 2 * padding), 11)
    wd = rng.randint(max(1, kernel - 2 * padding), 11)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, wd, generator=gen).relu() + 0.1 * torch.randn(
        n, c, h, wd, generator=gen
    )
    w = torch.randn(o, c, kernel, kernel, generator=gen)
    oh, ow = (h + 2 * padding - kernel) // stride + 1, (wd + 2 * padding - kernel) // stride + 1
    g = torch.randn(n, o, oh, ow, generator=gen)
    return x, w, g


def assert_near(actual, expected, rtol, what):
    """Elementwise ``|a - e| <= rtol * |e| + rtol * max|e|`` (the second term absorbs
    cancellation in sums of mixed signs)."""
    actual = actual.double()
    assert actual.shape == expected.shape, what
    scale = max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=what)


def run_op(ops, x, w, g, stride, padding, grad="full", input_grad="hardtanh"):
    return (
        ops.forward(x, w, stride, padding),
        ops.grad_input(g, x, w, stride, padding, input_grad),
        ops.grad_weight(g, x, w, stride, padding, grad),
    )


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Each fp32 case runs on the compiled kernels and on the torch path (what runs
    without a C compiler, and for fp64 and CUDA)."""
    if request.param == "torch":
        monkeypatch.setattr(native, "usable", lambda t: False)
    return request.param


def test_native_kernels_build_where_a_compiler_exists():
    if shutil.which("cc") or shutil.which("gcc"):
        assert native.library() is not None
        assert native.usable(torch.empty(1)) and not native.usable(torch.empty(1).double())


def official_normalised(dw):
    """The release's in-backward normalisation: dW / ||dW|| * sqrt(numel) / 5."""
    return dw / dw.norm() * math.sqrt(dw.numel()) / 5


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
def test_reference_matches_definition(kernel, stride, padding, path):
    seed = 100 * kernel + 10 * stride + padding
    x, w, g = random_case(kernel, stride, padding, seed)
    expected = brute_force(x, w, g, stride, padding)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        got = run_op(reference, x.to(dtype), w.to(dtype), g.to(dtype), stride, padding)
        for name, a, e in zip(("forward", "grad_input", "grad_weight"), got, expected):
            assert a.dtype == dtype, name
            assert_near(a, e, rtol, f"{name} {dtype}")


@pytest.mark.parametrize(
    "grad,input_grad", [("sign", "hardtanh"), ("full", "full"), ("sign", "sign")]
)
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 0), (7, 2, 3), (1, 2, 0)])
def test_reference_ablation_rules_match_definition(kernel, stride, padding, grad, input_grad, path):
    x, w, g = random_case(kernel, stride, padding, seed=31 * kernel + 7 * stride + padding)
    expected = brute_force(x, w, g, stride, padding, grad, input_grad)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        got = run_op(
            reference, x.to(dtype), w.to(dtype), g.to(dtype), stride, padding, grad, input_grad
        )
        for name, a, e in zip(("forward", "grad_input", "grad_weight"), got, expected):
            assert a.dtype == dtype, name
            assert_near(a, e, rtol, f"{name} {dtype} {grad}/{input_grad}")
    # the rules differ: the ablation is not the paper's backward under another name
    changed = 2 if grad == "sign" else 1
    assert not torch.allclose(expected[changed], brute_force(x, w, g, stride, padding)[changed])


@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 0), (7, 2, 3), (1, 2, 0)])
def test_reference_low_precision_accumulates_in_fp32(dtype, kernel, stride, padding, path):
    case = random_case(kernel, stride, padding, seed=7 * kernel + stride, channels=16)
    x, w, g = (t.to(dtype) for t in case)
    expected = brute_force(x, w, g, stride, padding)  # exact on the rounded inputs
    got = run_op(reference, x, w, g, stride, padding)
    for name, a, e in zip(("forward", "grad_input", "grad_weight"), got, expected):
        assert a.dtype == dtype, name
        assert_near(a, e, LOW_PRECISION[dtype] * 1.01 + 1e-6, f"{name} {dtype}")


@pytest.mark.parametrize(
    "kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (7, 1, 3), (1, 2, 0), (7, 2, 0)]
)
def test_unfold_baseline_matches_definition_with_official_normalisation(kernel, stride, padding):
    x, w, g = random_case(kernel, stride, padding, seed=kernel + 17 * padding + 5 * stride)
    y0, dx0, dw0 = brute_force(x, w, g, stride, padding)
    y, dx, dw = run_op(unfold, x, w, g, stride, padding)
    assert_near(y, y0, 2e-5, "forward")
    assert_near(dx, dx0, 2e-5, "grad_input")
    assert_near(dw, official_normalised(dw0), 2e-5, "grad_weight")
    assert dw.norm().item() == pytest.approx(0.2 * math.sqrt(w.numel()), rel=1e-5)


@pytest.mark.parametrize("backend", ["reference", "unfold"])
def test_autograd_through_adder_conv2d(backend, path):
    x, w, g = random_case(3, 2, 1, seed=3)
    layer = AdderConv2d(w.shape[1], w.shape[0], 3, stride=2, padding=1, backend=backend)
    with torch.no_grad():
        layer.weight.copy_(w)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    y0, dx0, dw0 = brute_force(x.detach(), w, g, 2, 1)
    if backend == "unfold":
        dw0 = official_normalised(dw0)
    assert_near(y.detach(), y0, 2e-5, "forward")
    assert_near(x.grad, dx0, 2e-5, "input gradient")
    assert_near(layer.weight.grad, dw0, 2e-5, "weight gradient")


# (N, C, H, W, C_out, kernel, stride, padding): a 3x3 layer and a 7x7 strided one
MEMORY_SHAPES = [(6, 8, 12, 12, 16, 3, 1, 1), (3, 4, 13, 11, 16, 7, 2, 3)]


@pytest.mark.parametrize("chunk,block", [(1 << 12, 1 << 12), (1 << 16, 1 << 18)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", MEMORY_SHAPES)
def test_reference_memory_stays_within_stated_bound(monkeypatch, shape, dtype, chunk, block, path):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", block)
    n, c, h, wd, o, k, s, p = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, wd, generator=gen).to(dtype)
    w = torch.randn(o, c, k, k, generator=gen).to(dtype)
    oh, ow = reference.out_size(h, wd, k, k, s, p)
    g = torch.randn(n, o, oh, ow, generator=gen).to(dtype)
    bound = reference.extra_bytes_bound(x.shape, w.shape, s, p, dtype)
    # the torch path's forward and grad_input always allocate the chunk buffer: the
    # measurement must see it; the native path allocates at least the block's patch rows
    kp = reference.padded(c * k * k)
    rows = reference.block_images(n, oh * ow, kp) * oh * ow
    buffer = (reference.chunk_rows(rows, o, kp) * o if path == "torch" else rows) * kp * 4
    broadcast = o * c * k * k * n * oh * ow * 4
    assert bound < broadcast / 2, "shape too small to tell chunking from broadcasting"
    for op, call in (
        ("forward", lambda: reference.forward(x, w, s, p)),
        ("grad_input", lambda: reference.grad_input(g, x, w, s, p)),
        ("grad_weight", lambda: reference.grad_weight(g, x, w, s, p)),
    ):
        out, peak = peak_bytes(call, CPU)
        extra = peak - out.numel() * out.element_size()
        assert extra <= bound, f"{op}: {extra} bytes beyond inputs and output, bound {bound}"
        if op != "grad_weight":
            assert extra >= buffer, f"{op}: measured {extra} bytes, under its {buffer}-byte buffer"


def test_peak_measurement_sees_the_unfold_broadcast():
    n, c, h, wd, o, k, s, p = MEMORY_SHAPES[0]
    x, w = torch.randn(n, c, h, wd), torch.randn(o, c, k, k)
    _, peak = peak_bytes(lambda: unfold.forward(x, w, s, p), CPU)
    assert peak >= o * c * k * k * n * h * wd * 4


def test_bench_op_quick_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "op.json"
    assert main(["bench", "op", "--quick", "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["batch"] == 2 and result["repeats"] == 1 and result["threads"] == 1
    layers = result["layers"]
    names = {r["layer"] for r in layers}
    # ResNet-20: 3x3 at 16/32/64 channels, two strided 3x3 and two 1x1 stride-2 shortcuts
    assert len(names) == 7 and len(layers) == 3 * 7
    assert sum(r["count"] for r in layers) == 3 * 20
    for r in layers + [result["step"]]:
        assert r["reference_ms"] > 0 and r["unfold_ms"] > 0
        assert r["speedup"] == pytest.approx(r["unfold_ms"] / r["reference_ms"])
        assert r["reference_peak_bytes"] > 0 and r["unfold_peak_bytes"] > 0
    assert {r["op"] for r in layers} == {"forward", "grad_input", "grad_weight"}
    # adder ops are stated against the measured ceiling; the GEMM weight gradient is not
    assert result["ceiling_elements_per_s"] > 0 and "ref of ceiling" in table
    shapes = {layer.name: layer for layer in adder_layer_shapes("resnet20", 2, image=32)}
    for r in layers:
        if r["op"] == "grad_weight":
            assert "reference_elements_per_s" not in r
        else:
            expected = shapes[r["layer"]].elements / r["reference_ms"] * 1e3
            assert r["reference_elements_per_s"] == pytest.approx(expected)
    assert "resnet20 train step" in table and "speedup" in table
    assert table.count("\n") >= len(layers) + 3


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--batch", "0"], "--batch"),
        (["--json", "/nonexistent-dir/op.json"], "nonexistent-dir"),
    ],
)
def test_bench_op_bad_arguments_are_user_errors(argv, needle, capsys):
    assert main(["bench", "op", *argv]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_on_cuda_matches_definition_within_bound(dtype):
    cuda = torch.device("cuda")
    rtol = 2e-5 if dtype == torch.float32 else LOW_PRECISION[dtype] * 1.01 + 1e-6
    for kernel, stride, padding in [(3, 1, 1), (7, 2, 3), (1, 2, 0)]:
        case = random_case(kernel, stride, padding, seed=kernel + stride, channels=16)
        x, w, g = (t.to(dtype) for t in case)
        expected = brute_force(x, w, g, stride, padding)
        x, w, g = x.to(cuda), w.to(cuda), g.to(cuda)
        got = run_op(reference, x, w, g, stride, padding)  # also warms up cuBLAS
        bound = reference.extra_bytes_bound(x.shape, w.shape, stride, padding, dtype)
        for name, a, e in zip(("forward", "grad_input", "grad_weight"), got, expected):
            assert a.device.type == "cuda" and a.dtype == dtype, name
            assert_near(a.cpu(), e, rtol, f"{name} {dtype} k{kernel}")
        for name in ("forward", "grad_input", "grad_weight"):
            args = (x, w, stride, padding) if name == "forward" else (g, x, w, stride, padding)
            op = getattr(reference, name)
            out, peak = peak_bytes(lambda op=op, args=args: op(*args), cuda)
            # the caching allocator rounds every block up to a multiple of 512 bytes
            assert peak - out.numel() * out.element_size() <= bound + 16 * 512, name
