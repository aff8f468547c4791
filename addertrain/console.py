"""What a run prints: the ``addertrain`` logger, rank 0's lines plain on stdout, the other
ranks' warnings and errors marked with their rank, and library chatter kept out.

The verbosity reaches every process of a run (workers under Ray included) through
``ADDERTRAIN_VERBOSITY``, which ``launch -q/-v`` set: -1 quiet (warnings and errors), 0 the
progress, evaluation and summary lines, 1 also the libraries' own information lines.
"""

from __future__ import annotations

import logging
import os
import sys

LOG = logging.getLogger("addertrain")
ENV = "ADDERTRAIN_VERBOSITY"


def verbosity() -> int:
    try:
        return max(-1, min(1, int(os.environ.get(ENV, "0"))))
    except ValueError:
        return 0


def setup(rank: int = 0) -> None:
    """Route the ``addertrain`` logger to stdout for this process; idempotent."""
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity()]
    if rank:  # one voice per run: the other ranks speak only when something is wrong
        level = max(level, logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter(
            "%(message)s" if rank == 0 else f"rank {rank}: %(levelname)s: %(message)s"
        )
    )
    LOG.handlers[:] = [handler]
    LOG.setLevel(level)
    LOG.propagate = False
