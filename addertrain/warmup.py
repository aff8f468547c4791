"""``addertrain warmup RECIPE``: compile and autotune the Triton adder kernels for a recipe's
layer shapes at its micro batch, into this node's Triton cache.

The first time a kernel meets a layer shape, Triton compiles every config the autotuner keeps
and times them (up to 6 + 3 configs x 22 shapes for ResNet-50, plus the weight gradient). A
rank doing that inside its first step holds every other rank at the first all-reduce, so each
worker runs this warm-up before its first step (launch/ray_executor.py, launch/command.py).
The ranks of one node take turns (a lock in the cache directory): the first compiles and tunes,
the others load the binaries and the autotuner's choices from the cache (``cache_results`` in
kernels/common.py), and all of them start training with the kernels in memory.

The cache is node-local by default, not Triton's ``~/.triton/cache`` on a home directory that
is often shared and then written by every rank of every node at once: ``TRITON_CACHE_DIR`` if
set (the launch forwards it to the workers), else ``addertrain-triton-<uid>`` (mode 700) in
the node's temp directory (``$TMPDIR`` or /tmp).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path

from addertrain.config import Config
from addertrain.console import LOG
from addertrain.errors import UserError

HELP = (
    "compile and autotune the Triton adder kernels for a recipe's layer shapes at its micro "
    "batch, into this node's Triton cache (launch does the same before the first step)"
)
LOCK = "addertrain-warmup.lock"


def use_node_cache() -> Path:
    """Point Triton at its cache directory for this process (and its children); returns it."""
    chosen = os.environ.get("TRITON_CACHE_DIR")
    path = Path(chosen or Path(tempfile.gettempdir()) / f"addertrain-triton-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not chosen:
        # A shared temp directory: the default name must be our own folder, not another
        # user's (or a link to one), or their kernels would run in our processes.
        st = path.lstat()
        if path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise UserError(
                f"the Triton cache folder {path} is not a private folder of this user "
                f"(owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}); remove it, or "
                "set TRITON_CACHE_DIR to a folder of your own"
            )
    os.environ["TRITON_CACHE_DIR"] = str(path)
    return path


def layer_shapes(cfg: Config) -> list:
    """The distinct adder layer shapes of the recipe's model at its micro batch and image size
    (``addertrain.models.shapes.Layer``: N, C, H, W, O, k, stride, padding and a count)."""
    from addertrain.models.shapes import adder_layer_shapes

    return adder_layer_shapes(
        cfg.model.arch,
        cfg.train.micro_batch,
        cfg.data.image_size,
        cfg.data.channels,
        cfg.model.num_classes,
    )


def nothing_to_compile(cfg: Config) -> str | None:
    """Why this process would run no compiled Triton kernel for ``cfg``; None if it would."""
    import torch

    if cfg.model.conv != "adder":
        return "model.conv=conv has no adder layers"
    if cfg.model.backend == "reference":
        return "model.backend=reference runs the adder layers without Triton"
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return (
                "no CUDA device here, and the Triton interpreter (TRITON_INTERPRET=1) runs the "
                "kernels without compiling them"
            )
        return "no CUDA device here: the adder layers run the reference op"
    return None


@contextlib.contextmanager
def _node_lock(cache: Path):
    """One warm-up at a time per cache directory (per node, by default)."""
    with open(cache / LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def warm(shapes: list, device) -> float:
    """Run the three kernels once on every shape on ``device``; returns the seconds it took."""
    import torch

    from addertrain import kernels

    start = time.perf_counter()
    with torch.cuda.device(device):  # Triton launches on the current device
        for layer in shapes:
            n, c, h, w, o, k, stride, padding = layer.shape
            oh, ow = layer.out_hw
            # The adder layer hands the kernels fp32 whatever the precision
            # (addertrain/nn/adder.py).
            x = torch.rand(n, c, h, w, device=device)
            weight = torch.rand(o, c, k, k, device=device)
            g = torch.rand(n, o, oh, ow, device=device)
            kernels.forward(x, weight, stride, padding)
            kernels.grad_input(g, x, weight, stride, padding)
            kernels.grad_weight(g, x, weight, stride, padding)
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def before_training(cfg: Config, local_rank: int) -> float | None:
    """In a worker, before its first step: warm the kernels it will run on its GPU (taking
    turns with the node's other ranks); returns the seconds it took, None if nothing to do."""
    if nothing_to_compile(cfg):
        return None
    import torch

    cache = use_node_cache()
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    shapes = layer_shapes(cfg)
    waited = time.perf_counter()
    with _node_lock(cache):
        waited = time.perf_counter() - waited
        seconds = warm(shapes, device)
    LOG.info(
        f"Triton kernels ready on {device} for {len(shapes)} layer shapes in {seconds:.1f} s "
        f"(after {waited:.1f} s waiting for the node's other ranks; cache {cache})"
    )
    return seconds


# -- the command ------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/resnet50_imagenet.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="override recipe values, e.g. train.micro_batch=64",
    )


def run(args) -> int:
    from addertrain import config

    cfg = config.load(args.recipe, args.overrides)
    if cfg.model.conv != "adder":
        print(f"nothing to compile: {nothing_to_compile(cfg)}")
        return 0
    shapes = layer_shapes(cfg)
    print(
        f"{cfg.model.arch}: {len(shapes)} distinct adder layer shapes at micro batch "
        f"{cfg.train.micro_batch}, {cfg.data.image_size} px"
    )
    for layer in shapes:
        print(f"  {layer.name}  x{layer.count}")
    reason = nothing_to_compile(cfg)
    if reason:
        print(f"nothing to compile: {reason}")
        return 0
    before_training(cfg, local_rank=0)
    return 0
