"""The ``addertrain`` command.

Each subcommand lives in its own module exposing ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; heavy imports happen inside ``run`` so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from addertrain import console
from addertrain.errors import Failure

# (group, name) -> module; group None means a top-level command.
COMMANDS = {
    (None, "launch"): "addertrain.launch.command",
    (None, "export"): "addertrain.export",
    (None, "eval"): "addertrain.evaluate",
    (None, "report"): "addertrain.report",
    (None, "sweep"): "addertrain.sweep",
    (None, "ops"): "addertrain.opcount",
    (None, "warmup"): "addertrain.warmup",
    ("bench", "op"): "addertrain.bench.op",
    ("bench", "kernels"): "addertrain.bench.kernels",
    ("bench", "data"): "addertrain.bench.data",
    ("bench", "scaling"): "addertrain.bench.scaling",
    ("bench", "launch"): "addertrain.bench.launch",
    ("data", "check"): "addertrain.data.check",
    ("data", "digits"): "addertrain.data.digits",
    ("data", "fake"): "addertrain.data.fake",
    ("data", "mnist5k"): "addertrain.data.mnist",
    ("data", "pack"): "addertrain.data.pack",
}
GROUP_HELP = {
    "bench": "measure speed and memory side by side with the baselines (prints a table, writes "
    "JSON)",
    "data": "prepare and check datasets",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("addertrain")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="addertrain",
        description="Train multiplication-free AdderNets: Triton adder kernels, DALI input, "
        "DeepSpeed workers orchestrated by Ray.",
    )
    parser.add_argument("--version", action="version", version=f"addertrain {_version()}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups = {}
    for (group, name), path in COMMANDS.items():
        module = importlib.import_module(path)
        if group is None:
            sub = top.add_parser(name, help=module.HELP, description=module.HELP)
        else:
            if group not in groups:
                g = top.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
                groups[group] = g.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            sub = groups[group].add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after an option (`launch R --smoke a=1`): such
    # key=value leftovers are overrides.
    if (
        extra
        and hasattr(args, "overrides")
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console.setup()
    try:
        return args._run(args) or 0
    except Failure as e:  # UserError (exit 2), RunStopped (its own code)
        print(f"addertrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # Ctrl-C stops at once, without a checkpoint; SIGTERM/SIGUSR1 checkpoint first (exit 75).
        print(
            "addertrain: interrupted (no checkpoint written now; a launch continues from its "
            "last checkpoint with --resume auto)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
