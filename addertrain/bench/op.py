"""``addertrain bench op``: the reference adder op against the official unfold formulation.

Side by side in one run, on every distinct ResNet-20 adder layer (CIFAR size, 32x32) at the
given batch: forward, input-gradient and weight-gradient times and peak memory of
addertrain.ops.reference and addertrain.ops.unfold (the official release's formulation),
then one whole ResNet-20 training step (forward, backward, SGD step) built with each
backend. The reference step applies the ALR in the optimizer; the unfold step has it in
its weight gradient, as the release does, so both compute the same kind of update.

Times: median of ``--repeats`` runs after one warm-up run, reference and unfold
alternating. Peak memory: the largest number of bytes torch held at one time during the
warm-up run, above what it held before it (outputs included). On the CPU it is read from
torch.profiler's memory events (profile_memory=True: every allocation and free of torch's
CPU allocator with the running total); on CUDA from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from addertrain.errors import UserError

HELP = (
    "reference adder op vs the official unfold formulation: every ResNet-20 adder layer "
    "and a ResNet-20 training step, time and peak memory (table + JSON)"
)

BACKENDS = ("reference", "unfold")
OPS = ("forward", "grad_input", "grad_weight")
QUICK_BATCH = 2  # the smallest batch BatchNorm trains on
MIB = float(1 << 20)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto writes two log lines straight to file descriptor 2 at every profiler start and
    stop, whatever KINETO_LOG_LEVEL says; silence only those calls."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn, device):
    """``(fn(), peak)``: the most bytes torch held at one time during ``fn`` beyond those
    held before it (the result's included)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    cpu = [
        e["args"]
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    ]
    if not cpu:
        return out, 0
    # The running total may include blocks from earlier profiling sessions; the first
    # event's total before its own allocation is this call's starting point.
    base = cpu[0]["Total Allocated"] - cpu[0]["Bytes"]
    return out, max(0, max(a["Total Allocated"] for a in cpu) - base)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(calls: dict, repeats: int, device) -> dict:
    """``{name: {"ms": median, "times": [ms, ...], "peak_bytes": peak}}`` for zero-argument
    callables, run in turn."""
    result = {}
    for name, fn in calls.items():
        _, peak = peak_bytes(fn, device)
        result[name] = {"peak_bytes": peak, "times": []}
    for _ in range(repeats):
        for name, fn in calls.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            result[name]["times"].append((time.perf_counter() - start) * 1e3)
    for r in result.values():
        r["ms"] = statistics.median(r["times"])
    return result


def _layer_tensors(shape, device):
    import torch

    n, c, h, w, o, k, s, p = shape
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    gen = torch.Generator().manual_seed(0)
    # post-ReLU activations and N(0, 1) weights, as inside an adder network
    x = torch.randn(n, c, h, w, generator=gen).relu_().to(device)
    wt = torch.randn(o, c, k, k, generator=gen).to(device)
    g = torch.randn(n, o, oh, ow, generator=gen).to(device)
    return x, wt, g, s, p


def _pair(result: dict) -> dict:
    ref, unf = result["reference"], result["unfold"]
    return {
        "reference_ms": ref["ms"],
        "unfold_ms": unf["ms"],
        "speedup": unf["ms"] / ref["ms"],
        "reference_peak_bytes": ref["peak_bytes"],
        "unfold_peak_bytes": unf["peak_bytes"],
        "memory_ratio": unf["peak_bytes"] / ref["peak_bytes"] if ref["peak_bytes"] else None,
        "reference_times_ms": ref["times"],
        "unfold_times_ms": unf["times"],
    }


def bench_layers(batch: int, repeats: int, device) -> list[dict]:
    from addertrain.models.shapes import adder_layer_shapes
    from addertrain.ops import reference, unfold

    rows = []
    for layer in adder_layer_shapes("resnet20", batch, image=32):
        x, w, g, s, p = _layer_tensors(layer.shape, device)
        for op in OPS:
            args = (x, w, s, p) if op == "forward" else (g, x, w, s, p)
            calls = {
                name: partial(getattr(mod, op), *args)
                for name, mod in (("reference", reference), ("unfold", unfold))
            }
            row = _pair(measure(calls, repeats, device))
            row.update(layer=layer.name, count=layer.count, op=op)
            if op != "grad_weight":  # a GEMM: adder elements are not what it computes
                row["reference_elements_per_s"] = layer.elements / row["reference_ms"] * 1e3
            rows.append(row)
    return rows


def _training_step(backend: str, batch: int, device):
    import torch
    import torch.nn.functional as F

    from addertrain.alr import AdderSGD, param_groups
    from addertrain.models import create_model

    torch.manual_seed(0)
    model = (
        create_model("resnet20", conv="adder", num_classes=10, head="auto", backend=backend)
        .to(device)
        .train()
    )
    # the unfold backend normalises its weight gradients itself, as the official release does
    opt = AdderSGD(
        param_groups(model, 5e-4),
        lr=0.1,
        momentum=0.9,
        eta=0.2,
        mode="alr" if backend == "reference" else "fixed",
    )
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def bench_step(batch: int, repeats: int, device) -> dict:
    calls = {name: _training_step(name, batch, device) for name in BACKENDS}
    row = _pair(measure(calls, repeats, device))
    row.update(
        step="resnet20 forward+backward+SGD step",
        images_per_s_reference=batch / row["reference_ms"] * 1e3,
        images_per_s_unfold=batch / row["unfold_ms"] * 1e3,
    )
    return row


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def format_table(result: dict) -> str:
    head = (
        f"{'layer':<22} {'op':<12} {'reference ms':>12} {'unfold ms':>10} {'speedup':>8} "
        f"{'ref peak MiB':>12} {'unfold peak MiB':>15} {'mem ratio':>9}"
    )
    ceiling = result.get("ceiling_elements_per_s")
    if ceiling:
        head += f" {'ref of ceiling':>14}"
    lines = [head, "-" * len(head)]

    def line(name, op, r):
        ratio = f"{r['memory_ratio']:.1f}" if r["memory_ratio"] else "-"
        text = (
            f"{name:<22} {op:<12} {r['reference_ms']:>12.1f} {r['unfold_ms']:>10.1f} "
            f"{r['speedup']:>7.1f}x {r['reference_peak_bytes'] / MIB:>12.1f} "
            f"{r['unfold_peak_bytes'] / MIB:>15.1f} {ratio:>9}"
        )
        if ceiling:
            rate = r.get("reference_elements_per_s")
            text += f" {f'{rate / ceiling:.0%}' if rate else '-':>14}"
        return text

    for r in result["layers"]:
        lines.append(line(f"{r['layer']} x{r['count']}", r["op"], r))
    if result.get("step"):
        lines.append("-" * len(head))
        lines.append(line("resnet20 train step", "fwd+bwd+sgd", result["step"]))
    if ceiling:
        lines.append(
            f"ceiling: {ceiling / 1e9:.1f} G adder elements/s on {result['threads']} threads "
            "(the forward's inner loop with its operands in registers; docs/reference-op.md)"
        )
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per measurement after one warm-up run; the median is reported",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)"
    )
    p.add_argument("--json", default="bench_op.json", help="where to write the results")
    p.add_argument("--no-step", action="store_true", help="skip the ResNet-20 training step line")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"batch {QUICK_BATCH}, one repeat: checks that the benchmark runs (for tests)",
    )


def run(args) -> int:
    if args.quick:
        args.batch, args.repeats = QUICK_BATCH, 1
    if args.batch < 1 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--batch, --repeats and --threads must be at least 1")
    out = Path(args.json)
    if not out.parent.is_dir():
        raise UserError(
            f"--json {args.json}: folder {out.parent} does not exist; create it or "
            "choose another path"
        )
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    from addertrain.ops import native

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "benchmark": "bench op",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch,
        "repeats": args.repeats,
        "timing": f"median of {args.repeats} runs after 1 warm-up run, backends alternating",
        "memory": (
            "peak bytes torch held during the warm-up run above those held before it; "
            + (
                "torch.cuda.max_memory_allocated"
                if device.type == "cuda"
                else "CPU: torch.profiler memory events (profile_memory=True)"
            )
        ),
        "ceiling_elements_per_s": (
            native.peak_elements_per_s(torch.get_num_threads()) if device.type == "cpu" else None
        ),
        "layers": bench_layers(args.batch, args.repeats, device),
        "step": None if args.no_step else bench_step(args.batch, args.repeats, device),
    }
    print(format_table(result))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {out}")
    return 0
