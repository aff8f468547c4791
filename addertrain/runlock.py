"""One launch per run directory.

The launch process holds an exclusive ``flock`` on ``RUN_DIR/launch.lock`` for the whole run
(workers, local or on Ray, never take it). The kernel drops the lock when its holder dies,
however it dies (kill -9 included), so a stale lock never blocks the next launch. The file
names its holder (pid, host, start time) for the message that refuses a second launch.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from addertrain.errors import UserError
from addertrain.storage import describe_write_error

LOCK_FILE = "launch.lock"


class RunLock:
    """Held from ``acquire`` until ``release`` or the end of the process."""

    def __init__(self, run_dir: Path, fd: int, created: list[Path]):
        self.run_dir, self._fd, self._created = run_dir, fd, created

    @property
    def created(self) -> bool:
        """Whether this launch created the run directory (it held nothing before)."""
        return bool(self._created)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Remove the run directory and the parents this launch created, then release.
        Only ever a directory that did not exist before this launch took the lock."""
        if self._created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for parent in self._created[1:]:  # innermost first; a parent someone else uses stays
                try:
                    parent.rmdir()
                except OSError:
                    break
        self.release()


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError):  # the holder is between taking the lock and writing this
        return "holder details not yet written"


def acquire(run_dir: Path) -> RunLock:
    """Take the run directory's lock, creating the directory if needed; UserError if a live
    launch holds it."""
    run_dir = Path(run_dir)
    for attempt in range(3):
        created = _missing_dirs(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            # a failed launch may have just removed the directory it had created: retry
            if isinstance(e, FileNotFoundError) and attempt < 2:
                continue
            raise UserError(describe_write_error(e, run_dir)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"{run_dir} is in use by a running launch ({holder}); wait for it to finish, stop "
                "it (SIGTERM checkpoints it), or launch under another run.name"
            ) from None
        # A launch that failed may have removed the directory (and the file we opened) just
        # before we locked it: only the file still at the path counts.
        try:
            same = os.stat(run_dir / LOCK_FILE).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise UserError(
            f"{run_dir} keeps being removed while this launch takes it over; "
            "launch again, or under another run.name"
        )
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError as e:  # a full disk: the lock is held, only its note is missing
        os.close(fd)
        raise UserError(describe_write_error(e, run_dir)) from None
    return RunLock(run_dir, fd, created)
