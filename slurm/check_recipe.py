"""Check a recipe with its overrides as ``addertrain launch`` does before any worker starts;
exit 2 with its message if bad.

    python check_recipe.py [--gpus-per-node G] RECIPE [key.path=value ...]

submit.sh runs it on the login node before queueing (passing the job's --gpus-per-node) and
addertrain.sbatch on the head node before starting Ray, so a typo, a batch that does not split
over the workers or a precision or ZeRO stage the job cannot run costs neither a queue wait nor
a cluster start.
"""

import argparse
import sys

from addertrain import config
from addertrain.errors import UserError
from addertrain.launch.command import worker_device_type


def device_type(cfg: config.Config, gpus_per_node: int | None) -> str:
    """The device type the run will train on, as launch decides it.

    Only the local executor with ``train.device=auto`` asks torch, on the node that runs the
    job; away from that node (the login node) the job's GPUs per node decide instead."""
    local_auto = cfg.distributed.executor == "local" and cfg.train.device == "auto"
    if gpus_per_node is None or not local_auto:
        return worker_device_type(cfg)
    return "cuda" if gpus_per_node > 0 else "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--gpus-per-node",
        type=int,
        metavar="G",
        help="the job's GPUs per node, when checking away from its nodes",
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = p.parse_args()
    try:
        cfg = config.load(args.recipe, args.overrides)
        cfg.check_device(device_type(cfg, args.gpus_per_node))
    except UserError as e:
        print(f"addertrain: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
