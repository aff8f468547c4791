"""Preemption: a SIGTERM or SIGUSR1 to the launch process asks the run to checkpoint and stop.

The request is a file in the run directory, so it reaches the workers whatever runs them
(this process, Ray workers on other nodes, ranks started by srun): rank 0 looks for it after
every step and tells the other ranks. The run then exits with ``EXIT_CODE`` (EX_TEMPFAIL),
which the Slurm scripts requeue on.
"""

from __future__ import annotations

import signal
from pathlib import Path

from addertrain.errors import EXIT_TEMPFAIL

EXIT_CODE = EXIT_TEMPFAIL
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def request_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "preempt"


def requested(run_dir: str | Path) -> bool:
    return request_file(run_dir).exists()


def clear(run_dir: str | Path) -> None:
    """A request left by the previous, preempted launch must not stop this one."""
    request_file(run_dir).unlink(missing_ok=True)


def install_handlers(run_dir: str | Path) -> None:
    def handler(signum, frame):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        request_file(run_dir).touch()
        print(
            f"addertrain: {signal.Signals(signum).name} received: checkpointing, then exiting "
            f"with code {EXIT_CODE}",
            flush=True,
        )

    for sig in SIGNALS:
        signal.signal(sig, handler)
