"""``addertrain bench kernels``: the Triton adder kernels on every distinct ResNet-50 adder layer.

For each layer shape at a training batch: forward, input gradient and weight gradient times
(median of triton.testing.do_bench), adder elements/s and their fraction of the card's FP32
ceiling (measured in the same run by an add-bound kernel, addertrain.kernels.ceiling), and
peak memory. Side by side: the official unfold-and-broadcast formulation
(addertrain.ops.unfold; at a smaller batch where the full one does not fit, scaled per image)
and cuDNN's conv2d forward / input gradient / weight gradient in the same dtype. Then one
whole-network line: ResNet-50 forward+backward img/s and peak memory for the triton and
reference adder backends and the CNN.

``--quick`` runs tiny shapes, on the CPU under TRITON_INTERPRET=1 too (tests use it);
``--compiler-report`` prints registers and hot-loop instruction mix of every kernel config
(compiled ahead of time, no GPU needed) and exits.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from addertrain.errors import UserError

if TYPE_CHECKING:
    from addertrain.models.shapes import Layer

HELP = (
    "adder kernels vs the unfold formulation and conv2d on every ResNet-50 adder layer, "
    "fraction of the measured FP32 ceiling, whole-network img/s (table + JSON)"
)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
OPS = ("forward", "grad_input", "grad_weight")
# Tiny layers for --quick: a 3x3 stride-1 and a 1x1 stride-2 shape.
QUICK_LAYERS = [(4, 6, 6, 4, 3, 1, 1), (4, 6, 6, 8, 1, 2, 0)]
# The unfold formulation may use at most this share of the free GPU memory.
UNFOLD_MEMORY_SHARE = 0.5


def _timer(device, cpu_repeats: int = 3):
    """Median milliseconds of a zero-argument callable."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu_time(fn):
        times = []
        for _ in range(cpu_repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_time


def _peak_bytes(fn, device) -> int | None:
    """Peak memory above what was allocated before the call (its outputs included); CUDA
    only, since under the interpreter the CPU allocator would measure numpy's work."""
    if device.type != "cuda":
        return None
    from addertrain.bench.op import peak_bytes

    return peak_bytes(fn, device)[1]


def measure_ceiling(device, time_ms) -> dict:
    import torch

    from addertrain.kernels import ceiling

    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        call, elements = ceiling.launch(sms * 8, 256, 4000, 8, device)
    else:
        call, elements = ceiling.launch(1, 16, 2, 1, device)
    call()
    ms = time_ms(call)
    return {"elements": elements, "ms": ms, "elements_per_s": elements / (ms * 1e-3)}


def _autotuned_config(op: str) -> str | None:
    from addertrain.kernels import dgrad, fprop

    kernel = {"forward": fprop._forward_kernel, "grad_input": dgrad._grad_input_kernel}.get(op)
    config = getattr(kernel, "best_config", None)
    if config is None:
        return None
    return (
        " ".join(f"{k}={v}" for k, v in config.kwargs.items())
        + f" warps={config.num_warps}"
        + (f" maxnreg={config.maxnreg}" if config.maxnreg else "")
    )


def _tensors(shape, dtype, device, batch=None):
    import torch

    n, c, h, w, o, k, s, p = shape
    n = batch or n
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    gen = torch.Generator(device=device).manual_seed(0)
    # post-ReLU activations and N(0, 1) weights, as in a trained adder network
    x = torch.randn(n, c, h, w, device=device, dtype=dtype, generator=gen).relu_()
    wt = torch.randn(o, c, k, k, device=device, dtype=dtype, generator=gen)
    g = torch.randn(n, o, oh, ow, device=device, dtype=dtype, generator=gen)
    return x, wt, g, s, p


def _adder_calls(impl, x, w, g, s, p) -> dict:
    return {
        "forward": lambda: impl.forward(x, w, s, p),
        "grad_input": lambda: impl.grad_input(g, x, w, s, p),
        "grad_weight": lambda: impl.grad_weight(g, x, w, s, p),
    }


def _conv_calls(x, w, g, s, p) -> dict:
    import torch
    import torch.nn.functional as F

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask
        )

    return {
        "forward": lambda: F.conv2d(x, w, stride=s, padding=p),
        "grad_input": backward([True, False, False]),
        "grad_weight": backward([False, True, False]),
    }


def _layer_pass(calls):
    """Forward, input gradient and weight gradient of one layer, all results alive at the end."""
    return lambda: [calls[op]() for op in OPS]


def _unfold_batch(layer: Layer, largest: int, device) -> int:
    """The largest batch (halving from ``largest``) whose broadcast temporaries fit the memory
    share."""
    import torch

    n, c, h, w, o, k, s, p = layer.shape
    oh, ow = layer.out_hw
    b = min(n, largest)
    if device.type != "cuda":
        return b
    free, _ = torch.cuda.mem_get_info(device)
    # [O, K, b*L] in fp32 (the formulation's accumulation dtype), about three alive at once
    while b > 1 and 3 * 4 * o * c * k * k * b * oh * ow > UNFOLD_MEMORY_SHARE * free:
        b //= 2
    return b


def measure_unfold(unfold, layer: Layer, largest_batch: int, dtype, device, time_ms) -> dict:
    """The official formulation at a batch that fits; its times scaled per image to the full
    batch."""
    import torch

    b = _unfold_batch(layer, largest_batch, device)
    while True:
        try:
            calls = _adder_calls(unfold, *_tensors(layer.shape, dtype, device, batch=b))
            scale = layer.shape[0] / b
            return {
                "batch": b,
                **{op: time_ms(calls[op]) * scale for op in OPS},
                "peak_bytes_at_batch": _peak_bytes(_layer_pass(calls), device),
            }
        except torch.cuda.OutOfMemoryError:
            calls = None
            torch.cuda.empty_cache()
            if b == 1:
                return {"batch": 0, "error": "out of memory at batch 1"}
            b //= 2


def measure_layer(
    layer: Layer, dtype, device, time_ms, ceiling_rate, unfold, unfold_batch: int
) -> dict:
    from addertrain import kernels

    x, w, g, s, p = _tensors(layer.shape, dtype, device)
    ours = _adder_calls(kernels, x, w, g, s, p)
    conv = _conv_calls(x, w, g, s, p)
    row = {
        "index": layer.index,
        "name": layer.name,
        "shape": list(layer.shape),
        "count": layer.count,
        "elements": layer.elements,
        "ops": {},
    }
    for op in OPS:
        ours[op]()  # autotune + compile outside the timing
        ms = time_ms(ours[op])
        rate = layer.elements / (ms * 1e-3)
        row["ops"][op] = {
            "triton_ms": ms,
            "elements_per_s": rate,
            "fraction_of_ceiling": rate / ceiling_rate,
            "config": _autotuned_config(op),
            "conv_ms": time_ms(conv[op]),
        }
        row["ops"][op]["triton_over_conv"] = ms / row["ops"][op]["conv_ms"]
    total = sum(row["ops"][op]["triton_ms"] for op in OPS)
    conv_total = sum(row["ops"][op]["conv_ms"] for op in OPS)
    row["layer"] = {
        "triton_ms": total,
        "conv_ms": conv_total,
        "triton_over_conv": total / conv_total,
        "triton_peak_bytes": _peak_bytes(_layer_pass(ours), device),
        "conv_peak_bytes": _peak_bytes(_layer_pass(conv), device),
    }
    if row["layer"]["conv_peak_bytes"]:
        row["layer"]["peak_over_conv"] = (
            row["layer"]["triton_peak_bytes"] / row["layer"]["conv_peak_bytes"]
        )
    del x, w, g, ours, conv
    if unfold is not None:
        u = measure_unfold(unfold, layer, unfold_batch, dtype, device, time_ms)
        row["unfold"] = u
        for op in OPS:
            if op in u:
                row["ops"][op]["unfold_ms"] = u[op]
                row["ops"][op]["unfold_over_triton"] = u[op] / row["ops"][op]["triton_ms"]
        if all(op in u for op in OPS):
            row["layer"]["unfold_ms"] = sum(u[op] for op in OPS)
            row["layer"]["unfold_over_triton"] = row["layer"]["unfold_ms"] / total
    return row


def _training_pass(model, x, labels):
    """A forward and backward of ``model`` on one batch, as a zero-argument callable."""
    import torch.nn.functional as F

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), labels).backward()

    return step


def measure_network(
    arch: str,
    batch: int,
    image: int,
    classes: int,
    dtype,
    device,
    steps: int,
    budget_s: float,
    warmup: bool = True,
) -> dict:
    """Forward+backward img/s and peak memory of the adder network (triton, reference) and the
    CNN."""
    import torch

    from addertrain.models import create_model

    # the reference backend last: it is the slowest and the most likely to run out of time
    variants = {
        "triton": dict(conv="adder", backend="triton"),
        "cnn": dict(conv="conv"),
        "reference": dict(conv="adder", backend="reference"),
    }
    out = {"arch": arch, "batch": batch, "image": image, "classes": classes}
    for name, kwargs in variants.items():
        model = step = None
        try:
            model = create_model(arch, num_classes=classes, **kwargs).to(device=device, dtype=dtype)
            step = _training_pass(
                model.train(),
                torch.randn(batch, 3, image, image, device=device, dtype=dtype),
                torch.randint(0, classes, (batch,), device=device),
            )
            if warmup:
                step()  # autotune, compile, cuDNN plans
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            seconds = []
            while len(seconds) < steps and sum(seconds) < budget_s:
                start = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
            n, seconds = len(seconds), sum(seconds)
            out[name] = {
                "steps": n,
                "img_per_s": batch * n / seconds,
                "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            }
        except torch.cuda.OutOfMemoryError:
            out[name] = {"error": f"out of memory at batch {batch}"}
        finally:
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for other in ("reference", "cnn"):
        if "img_per_s" in out["triton"] and "img_per_s" in out[other]:
            out[f"triton_over_{other}"] = out["triton"]["img_per_s"] / out[other]["img_per_s"]
    return out


def summarize(rows: list[dict], network: dict | None) -> dict:
    """The issue's targets, read off the measurements."""

    def values(key, select):
        return [select(r) for r in rows if key(r)]

    def is3x3(r):
        return r["shape"][5] == 3

    summary = {
        "forward_3x3_fraction_min": min(
            values(is3x3, lambda r: r["ops"]["forward"]["fraction_of_ceiling"]), default=None
        ),
        "grad_input_3x3_fraction_min": min(
            values(is3x3, lambda r: r["ops"]["grad_input"]["fraction_of_ceiling"]), default=None
        ),
        "layer_unfold_over_triton_min": min(
            values(
                lambda r: "unfold_over_triton" in r["layer"],
                lambda r: r["layer"]["unfold_over_triton"],
            ),
            default=None,
        ),
        "layer_peak_over_conv_max": max(
            values(
                lambda r: "peak_over_conv" in r["layer"], lambda r: r["layer"]["peak_over_conv"]
            ),
            default=None,
        ),
        # the network's adder layers at this batch: sum over layers of count x (fwd + both grads)
        "adder_layers_ms_per_step": sum(r["count"] * r["layer"]["triton_ms"] for r in rows),
        "conv_layers_ms_per_step": sum(r["count"] * r["layer"]["conv_ms"] for r in rows),
    }
    if network and "img_per_s" in network.get("triton", {}):
        summary["network_triton_img_per_s"] = network["triton"]["img_per_s"]
    return summary


def _fmt(v, spec=".3g", missing="-"):
    return missing if v is None else format(v, spec)


def _mb(nbytes):
    return _fmt(None if nbytes is None else nbytes / 2**20, ".0f")


def format_table(result: dict) -> str:
    c = result["ceiling"]
    lines = [
        f"{result['device']}  dtype {result['dtype']}  batch {result['batch']}  "
        f"FP32 ceiling (add-bound kernel): {c['elements_per_s'] / 1e12:.2f} T adder elements/s",
        f"{'#':>2} {'layer':<26} {'op':<11} {'ms':>8} {'Telem/s':>8} {'%ceil':>6} "
        f"{'conv ms':>8} {'x conv':>7} {'unfold ms':>10} {'unf/tri':>7} {'config'}",
    ]
    for r in result["layers"]:
        for op in OPS:
            o = r["ops"][op]
            lines.append(
                f"{r['index']:>2} {r['name'] if op == 'forward' else '':<26} {op:<11} "
                f"{o['triton_ms']:>8.3f} {o['elements_per_s'] / 1e12:>8.3f} "
                f"{100 * o['fraction_of_ceiling']:>6.1f} "
                f"{o['conv_ms']:>8.3f} {o['triton_over_conv']:>7.2f} "
                f"{_fmt(o.get('unfold_ms'), '.2f'):>10} "
                f"{_fmt(o.get('unfold_over_triton'), '.1f'):>7} "
                f"{o['config'] or ''}"
            )
        lay = r["layer"]
        unf = r.get("unfold", {})
        lines.append(
            f"{'':>2} {'x' + str(r['count']) + ' in network':<26} {'layer':<11} "
            f"{lay['triton_ms']:>8.3f} "
            f"{'':>8} {'':>6} {lay['conv_ms']:>8.3f} {lay['triton_over_conv']:>7.2f} "
            f"{_fmt(lay.get('unfold_ms'), '.2f'):>10} "
            f"{_fmt(lay.get('unfold_over_triton'), '.1f'):>7} "
            f"peak MB: triton {_mb(lay['triton_peak_bytes'])}, conv {_mb(lay['conv_peak_bytes'])}"
            + (
                f", unfold {_mb(unf.get('peak_bytes_at_batch'))} at batch {unf['batch']}"
                if unf.get("batch")
                else ""
            )
            + (f" (unfold: {unf['error']})" if "error" in unf else "")
        )
    s = result["summary"]
    lines.append(
        f"3x3 layers, min fraction of ceiling: forward "
        f"{_fmt(s['forward_3x3_fraction_min'], '.1%')}, "
        f"grad_input {_fmt(s['grad_input_3x3_fraction_min'], '.1%')};  "
        f"whole layer unfold/triton min "
        f"{_fmt(s['layer_unfold_over_triton_min'], '.1f')}x;  peak memory triton/conv max "
        f"{_fmt(s['layer_peak_over_conv_max'], '.2f')}x"
    )
    lines.append(
        f"adder layers per step (sum over the network): {s['adder_layers_ms_per_step']:.1f} ms "
        f"vs conv {s['conv_layers_ms_per_step']:.1f} ms"
    )
    net = result.get("network")
    if net:
        parts = []
        for name in ("triton", "reference", "cnn"):
            v = net.get(name, {})
            peak = None if v.get("peak_bytes") is None else v["peak_bytes"] / 2**30
            parts.append(
                f"{name} "
                + (
                    f"{v['img_per_s']:.1f} img/s, peak {_fmt(peak, '.2f')} GB"
                    if "img_per_s" in v
                    else v.get("error", "not run")
                )
            )
        lines.append(
            f"{net['arch']} fwd+bwd batch {net['batch']} @{net['image']}px: " + "; ".join(parts)
        )
        ratios = [
            f"triton/{o} {net[f'triton_over_{o}']:.2f}x"
            for o in ("reference", "cnn")
            if f"triton_over_{o}" in net
        ]
        if ratios:
            lines.append("  " + ", ".join(ratios))
    return "\n".join(lines)


def compiler_report() -> list[dict]:
    """Registers and hot-loop mix of every forward / grad_input config (ahead-of-time compile)."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UserError("--compiler-report compiles for the GPU: unset TRITON_INTERPRET")
    from addertrain.kernels import dgrad, fprop, report

    variants = {"3x3 s1 p1": dict(KH=3, STRIDE=1, PAD=1), "1x1 s1 p0": dict(KH=1, STRIDE=1, PAD=0)}
    rows = []
    for op, kernel in (
        ("forward", fprop._forward_kernel),
        ("grad_input", dgrad._grad_input_kernel),
    ):
        for config in kernel.configs:
            for vname, variant in variants.items():
                r = report.config_report(kernel.fn, config, variant)
                rows.append(
                    {
                        "op": op,
                        "variant": vname,
                        "config": dict(config.kwargs),
                        "num_warps": config.num_warps,
                        "maxnreg": config.maxnreg,
                        **r,
                    }
                )
    return rows


def format_compiler_report(rows: list[dict]) -> str:
    lines = [
        f"{'op':<11} {'variant':<10} {'TM TN GM GN BK w cap':<22} {'regs':>4} {'stack':>5} "
        f"{'warps/SM':>8} {'loop ins':>8} "
        f"{'FP32':>5} {'FP32 %':>6} {'LDG':>4} {'smem':>4} {'spill':>5}"
    ]
    for r in rows:
        c = r["config"]
        tiles = (
            f"{c['TM']} {c['TN']} {c['GM']} {c['GN']} {c['BK']} {r['num_warps']} "
            f"{r.get('maxnreg') or '-'}"
        )
        lines.append(
            f"{r['op']:<11} {r['variant']:<10} {tiles:<22} "
            f"{r['registers']:>4} {r['stack_bytes']:>5} "
            f"{_fmt(r['resident_warps_per_sm'], 'd'):>8} {r['loop_instructions']:>8} "
            f"{r['loop_fp32']:>5} "
            f"{_fmt(r['loop_fp32_fraction'], '.0%'):>6} {r['loop_loads']:>4} "
            f"{r['loop_shared_ops']:>4} "
            f"{r['loop_spill_ops']:>5}"
        )
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="input dtype of every kernel and baseline (default fp32)",
    )
    p.add_argument(
        "--batch", type=int, default=64, help="batch of the layer benchmarks (default 64)"
    )
    p.add_argument(
        "--layers",
        default="all",
        help="comma-separated layer indices as printed in the table (default all)",
    )
    p.add_argument(
        "--network-batch",
        type=int,
        default=64,
        help="batch of the whole-network line (default 64; 0 skips it)",
    )
    p.add_argument(
        "--network-steps", type=int, default=5, help="timed steps per network (default 5)"
    )
    p.add_argument(
        "--network-budget",
        type=float,
        default=30.0,
        help="seconds of timed steps per network at most (default 30)",
    )
    p.add_argument("--no-unfold", action="store_true", help="skip the unfold formulation")
    p.add_argument(
        "--unfold-batch",
        type=int,
        default=8,
        help="largest batch for the unfold formulation, whose times are scaled per image "
        "to --batch (default 8: its [C_out, K, N*L] temporaries are ~0.5 GB per image)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes (runs on the CPU under TRITON_INTERPRET=1): checks the plumbing",
    )
    p.add_argument(
        "--compiler-report",
        action="store_true",
        help="print registers and hot-loop instruction mix of every kernel config and exit",
    )
    p.add_argument("--json", default="bench_kernels.json", help="where to write the results")


def _select(layers: list[Layer], spec: str) -> list[Layer]:
    if spec == "all":
        return layers
    try:
        wanted = {int(i) for i in spec.split(",")}
    except ValueError:
        raise UserError(
            f"--layers {spec!r}: give comma-separated layer indices (0..{len(layers) - 1}) or all"
        ) from None
    unknown = wanted - {layer.index for layer in layers}
    if unknown:
        raise UserError(
            f"--layers: no layer {sorted(unknown)}; the indices run 0..{len(layers) - 1}"
        )
    return [layer for layer in layers if layer.index in wanted]


def run(args) -> int:
    if args.compiler_report:
        rows = compiler_report()
        print(format_compiler_report(rows))
        Path(args.json).write_text(json.dumps({"compiler_report": rows}, indent=1) + "\n")
        print(f"results written to {args.json}")
        return 0
    if (
        min(args.batch, args.network_steps, args.unfold_batch) < 1
        or args.network_batch < 0
        or args.network_budget <= 0
    ):
        raise UserError(
            "--batch, --unfold-batch and --network-steps must be at least 1, "
            "--network-batch at least 0 and --network-budget positive"
        )
    import os

    import torch

    from addertrain.models.shapes import Layer, adder_layer_shapes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(
            "addertrain bench kernels needs a CUDA device; on a CPU run it with "
            "TRITON_INTERPRET=1 and --quick"
        )
    if device.type != "cuda" and not args.quick:
        raise UserError(
            "without a GPU only --quick runs (the interpreter is far too slow for ResNet-50 shapes)"
        )
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.quick:
        batch, arch, image = min(args.batch, 2), "resnet20", 4
        layers = [Layer(i, (batch, *shape), 1) for i, shape in enumerate(QUICK_LAYERS)]
    else:
        batch, arch, image = args.batch, "resnet50", 224
        layers = adder_layer_shapes("resnet50", batch)
    layers = _select(layers, args.layers)
    from addertrain.ops import unfold as unfold_ops

    unfold = None if args.no_unfold else unfold_ops
    time_ms = _timer(device, cpu_repeats=1 if args.quick else 3)
    ceiling = measure_ceiling(device, time_ms)
    print(f"  FP32 ceiling: {ceiling['elements_per_s'] / 1e12:.2f} T adder elements/s", flush=True)
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "cpu (interpreter)",
        "dtype": args.dtype,
        "batch": batch,
        "ceiling": ceiling,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "layers": [],
    }
    path = Path(args.json)

    def save():
        # after every step, so a run cut short by a time limit still leaves its measurements
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    for layer in layers:
        row = measure_layer(
            layer, dtype, device, time_ms, ceiling["elements_per_s"], unfold, args.unfold_batch
        )
        result["layers"].append(row)
        save()
        print(
            f"  layer {layer.index} {layer.name}: "
            + ", ".join(
                f"{op} {row['ops'][op]['triton_ms']:.3f} ms "
                f"({row['ops'][op]['fraction_of_ceiling']:.0%})"
                for op in OPS
            ),
            flush=True,
        )
    result["summary"] = summarize(result["layers"], None)
    if args.network_batch:
        # batch 2 at least: the classifier's BatchNorm needs two samples in training mode
        nb, classes = (2, 10) if args.quick else (args.network_batch, 1000)
        result["network"] = measure_network(
            arch,
            nb,
            image,
            classes,
            dtype,
            device,
            1 if args.quick else args.network_steps,
            args.network_budget,
            warmup=not args.quick,
        )
        result["summary"] = summarize(result["layers"], result["network"])
    save()
    print(format_table(result))
    print(f"results written to {args.json}")
    return 0
