"""Why a write to the run directory failed, in one line: a full disk, a read-only file system,
missing permission, or a file where a folder belongs."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from addertrain.errors import UserError

# torch.save reports a short write by its zip writer this way, not with ENOSPC.
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")


def _free(path: Path) -> str:
    for p in (path, *path.parents):
        if p.exists():
            return f"{shutil.disk_usage(p).free / 2**20:.0f} MiB free"
    return "free space unknown"


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest of ``path`` and its parents that exists and is not a folder."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def describe_write_error(e: BaseException, path: str | Path) -> str | None:
    """What went wrong writing ``path`` and what to do, or None when ``e`` is not a storage
    failure (the caller re-raises it)."""
    path = Path(path)
    if isinstance(e, RuntimeError) and any(s in str(e) for s in TORCH_SHORT_WRITE):
        return (
            f"writing {path} failed part-way, most likely because its disk is full "
            f"({_free(path)}); free space or set run.dir to a larger disk, then resume"
        )
    if not isinstance(e, OSError):
        return None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left for {path} ({e.strerror}, {_free(path)}); free space or set "
            "run.dir to a larger disk, then resume"
        )
    if e.errno == errno.EROFS:
        return f"{path} is on a read-only file system; set run.dir to a writable folder"
    if e.errno in (errno.EACCES, errno.EPERM):
        return (
            f"no permission to write {path}; set run.dir to a folder you can write, or "
            "change the folder's permissions"
        )
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and (blocker := _file_in_the_way(path)):
        return f"{blocker} is a file, not a folder; set run.dir to a folder (or remove the file)"
    return f"cannot write {path}: {e.strerror or e}"


def check_writable(folder: str | Path) -> None:
    """Raise UserError unless ``folder`` can be created (if missing) and written to: create a
    small file in its nearest existing ancestor and remove it again, leaving nothing behind."""
    folder = Path(folder)
    if blocker := _file_in_the_way(folder):
        raise UserError(
            f"{blocker} is a file, not a folder; set run.dir to a folder (or remove the file)"
        )
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".addertrain-probe-") as probe:
            # a few blocks, so that a full disk shows here rather than at the first checkpoint
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        raise UserError(describe_write_error(e, folder)) from None
