"""Reading samples out of packed shards (``data.source: packed``, format in
:mod:`addertrain.data.shards`) by offset.

A worker opens a shard the first time it reads from it and keeps it open, so an epoch costs
at most one ``open`` per shard instead of one per image: on a network file system the
metadata operations, not the bytes, are what a million-file folder runs out of.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from addertrain.errors import UserError


def split_digest(classes: list[str], shards: list) -> str:
    """A short hash of a packed split from its manifest (the shards' sha256 and counts), to
    tell a changed dataset on resume without reading a sample."""
    h = hashlib.sha256("\n".join(classes).encode())
    for s in shards:
        h.update(f"\n{s.name}\t{s.sha256}\t{s.samples}".encode())
    return h.hexdigest()[:16]


class ShardReader:
    """The encoded bytes of sample-table rows, read with ``os.pread`` by ``threads`` threads.

    ``os.pread`` releases the GIL, so the threads overlap the waits of a slow file system; a
    batch is cut into one contiguous run of rows per thread, which keeps the pool's overhead
    per batch, not per sample."""

    def __init__(self, root: Path, names: list[str], threads: int):
        self.root, self.names, self.threads = root, names, threads
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, "shard-read") if threads > 1 else None

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    path = self.root / self.names[shard]
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    except OSError as e:
                        raise UserError(
                            f"cannot open shard {path} ({e.strerror}); restore it or repack "
                            f"with `addertrain data pack` (`addertrain data check {self.root}` "
                            "verifies every shard)"
                        ) from None
                    self._fds[shard] = fd
        return fd

    def _read_run(self, rows: np.ndarray) -> list[np.ndarray]:
        out = []
        for shard, offset, size in zip(
            rows["shard"].tolist(), rows["offset"].tolist(), rows["size"].tolist()
        ):
            data = os.pread(self._fd(shard), size, offset)
            if len(data) != size:
                raise UserError(
                    f"shard {self.root / self.names[shard]} ends before byte {offset + size}: "
                    f"it is truncated; repack it (`addertrain data check {self.root}` verifies "
                    "every shard)"
                )
            out.append(np.frombuffer(data, np.uint8))
        return out

    def read(self, rows: np.ndarray) -> list[np.ndarray]:
        """The samples of ``rows`` (sample-table rows), in order, as uint8 arrays."""
        if self._pool is None or len(rows) < 2:
            return self._read_run(rows)
        bounds = np.linspace(0, len(rows), min(self.threads, len(rows)) + 1).astype(int)
        runs = self._pool.map(self._read_run, [rows[a:b] for a, b in zip(bounds, bounds[1:])])
        return [sample for run in runs for sample in run]

    def open_shards(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def sample_key(root: Path, split: str, row: int) -> str:
    """The key (tar member name without suffix) of sample-table row ``row``."""
    with open(root / f"{split}.keys.txt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i == row:
                return line.rstrip("\n")
    return f"row {row}"
