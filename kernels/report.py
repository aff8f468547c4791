"""The compiler's view of a kernel config: registers, spills, and the instruction mix of the hot
loop.

Compiles ahead of time for an NVIDIA target (the current GPU, else sm_90), so it also runs on
a machine without a GPU, and reads the SASS with ``cuobjdump``. The hot loop is the innermost
backward branch holding the most FP32 arithmetic; its FP32 share bounds what the kernel can
reach of the add-bound ceiling when instruction issue is the limit.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FP32_OPS = ("FADD", "FFMA", "FMUL")
SHARED_OPS = ("LDS", "STS", "STSM", "LDSM", "BAR")
_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)([^;]*);")


def cuobjdump() -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else (shutil.which("cuobjdump") or "cuobjdump")


def _target():
    import torch
    from triton.backends.compiler import GPUTarget

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return GPUTarget("cuda", major * 10 + minor, 32)
    return GPUTarget("cuda", 90, 32)


def compile_sass(
    jit_fn, constexprs: dict, num_warps: int, dtype: str = "fp32", maxnreg: int | None = None
) -> tuple[str, str]:
    """(resource usage, SASS) of ``jit_fn`` with pointers of ``dtype`` and int32 scalars."""
    import triton
    from triton.compiler import ASTSource

    # constexprs with a default (an ablation switch) take it unless given
    constexprs = {
        **{p.name: p.default for p in jit_fn.params if p.is_constexpr and p.has_default},
        **constexprs,
    }
    signature = {
        name: (
            "constexpr" if name in constexprs else f"*{dtype}" if name.endswith("_ptr") else "i32"
        )
        for name in jit_fn.arg_names
    }
    compiled = triton.compile(
        ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs),
        target=_target(),
        options={
            "num_warps": num_warps,
            "num_stages": 1,
            **({"maxnreg": maxnreg} if maxnreg else {}),
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = cuobjdump()
        usage = subprocess.run(
            [tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [tool, "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    return usage, sass


def hot_loop(sass: str) -> collections.Counter:
    """Opcode counts of the innermost loop with the most FP32 instructions."""
    ins = [
        (int(m.group(1), 16), m.group(2), m.group(3))
        for m in map(_INSTRUCTION.match, sass.splitlines())
        if m
    ]
    loops = []
    for address, op, operands in ins:
        target = re.search(r"0x([0-9a-f]+)", operands) if op == "BRA" else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    innermost = [
        (lo, hi)
        for lo, hi in loops
        if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)
    ]
    best = collections.Counter()
    for lo, hi in innermost:
        ops = collections.Counter(op for address, op, _ in ins if lo <= address <= hi)
        if sum(ops[o] for o in FP32_OPS) > sum(best[o] for o in FP32_OPS):
            best = ops
    return best


def summarize(usage: str, sass: str, num_warps: int) -> dict:
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, shared, _ = map(int, res.groups()) if res else (0, 0, 0, 0)
    loop = hot_loop(sass)
    total = sum(loop.values())
    fp32 = sum(loop[o] for o in FP32_OPS)
    # Registers are allocated per warp in units of 256: this bounds the resident warps.
    per_warp = -(-regs * 32 // 256) * 256
    warps = min(64, 65536 // max(per_warp, 1) // num_warps * num_warps) if regs else None
    return {
        "registers": regs,
        "stack_bytes": stack,
        "shared_bytes": shared,
        "resident_warps_per_sm": warps,
        "loop_instructions": total,
        "loop_fp32": fp32,
        "loop_fp32_fraction": fp32 / total if total else None,
        "loop_loads": loop["LDG"],
        "loop_spill_ops": loop["LDL"] + loop["STL"],
        # layout conversions through shared memory: what held grad_input at 10-16% in run 1
        "loop_shared_ops": sum(loop[o] for o in SHARED_OPS),
        "loop_top_ops": dict(loop.most_common(8)),
    }


def config_report(jit_fn, config, variant: dict, dtype: str = "fp32") -> dict:
    """Compile one autotune ``config`` for one shape ``variant`` (its constexprs) and summarize."""
    constexprs = {**variant, **config.kwargs}
    usage, sass = compile_sass(jit_fn, constexprs, config.num_warps, dtype, config.maxnreg)
    return summarize(usage, sass, config.num_warps)
