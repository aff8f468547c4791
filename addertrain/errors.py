"""The exceptions that end a command with one line and an exit code, and the one-line
reading of an error a worker met (what happened and what to do about it)."""

from __future__ import annotations

import errno
import re

# Exit codes of `addertrain launch` (README, "Exit codes")
EXIT_FAILED = 1  # a failure a retry would meet again (out of memory, disk full, bad data)
EXIT_BAD_INPUT = 2
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: checkpointed or kept the last checkpoint; run it again
EXIT_INTERRUPTED = 130


class Failure(Exception):
    """Ends a command: the CLI prints ``str(err)`` (one line, no traceback) and exits with
    ``exit_code``."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    def __reduce__(self):  # crosses process boundaries (Ray) with its exit code
        return (self.__class__, (str(self), self.exit_code))


class UserError(Failure):
    """Bad input from the user (recipe, dataset, checkpoint, command line).

    The CLI prints ``str(err)`` without a traceback and exits with code 2, so the
    message must name the thing that is wrong and how to fix it.
    """

    exit_code = EXIT_BAD_INPUT


class RunStopped(Failure):
    """The run could not go on (a lost node, a hung peer, an error in a worker); the message
    names the cause, the fix or the checkpoint to continue from, and the log with the details."""


def root_cause(err: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrapper (``RayTaskError.cause``)."""
    return getattr(err, "cause", None) or err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip(": ")


def _last_own_frame(traceback_text: str) -> str | None:
    """The innermost frame of addertrain's code in a formatted traceback."""
    frames = re.findall(r'File "([^"]*addertrain/[^"]+)", line \d+', traceback_text)
    return frames[-1] if frames else None


def describe(err: BaseException, traceback_text: str = "") -> tuple[str, bool] | None:
    """(cause and fix in one line, whether it is the worker's own) for the failures a user can
    cause or meet in a worker; ``None`` for the others (a peer's loss seen from a survivor).
    ``traceback_text``: the worker's formatted traceback (Ray sends it as text)."""
    cause = root_cause(err)
    text = f"{cause}"
    if isinstance(cause, UserError):
        return str(cause), True
    if isinstance(cause, FloatingPointError):
        return f"{cause}", True
    oom = isinstance(cause, MemoryError) or type(cause).__name__ == "OutOfMemoryError"
    if oom or "out of memory" in text.lower():
        return (
            f"out of memory ({_first_line(cause)[:160]}): lower train.micro_batch (the global "
            "batch is kept by gradient accumulation) or use bigger devices",
            True,
        )
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {cause.filename}" if cause.filename else ""
        return (
            f"the disk is full{where}: free space there (old runs, checkpoint.keep_last) or set "
            "run.dir to a larger file system",
            True,
        )
    if _is_peer_loss(cause, text):
        return None
    frame = _last_own_frame(traceback_text or text)
    if frame and "/addertrain/data/" in frame:
        return (
            f"reading the training data failed ({_first_line(cause)[:200]}): check the dataset "
            "with `addertrain data check ROOT`, remove or replace the file it names",
            True,
        )
    return f"{_first_line(cause)[:240]}", True


PEER_LOSS = (
    "connection closed by peer",
    "connection reset by peer",
    "timed out",
    "timeout",
    "broken pipe",
    "gloo",
    "nccl",
    "actor died",
    "health check",
    "unavailable",
)


def _is_peer_loss(cause: BaseException, text: str) -> bool:
    """What a survivor sees when a peer is lost or hangs, and Ray's own word for a lost worker."""
    name = type(cause).__name__
    if name in ("ActorDiedError", "ActorUnavailableError", "RayActorError", "NodeDiedError"):
        return True
    if name.startswith("WorkerHealthCheck") or name == "DistBackendError":
        return True
    low = text.lower()
    return isinstance(cause, (RuntimeError, ConnectionError)) and any(w in low for w in PEER_LOSS)
