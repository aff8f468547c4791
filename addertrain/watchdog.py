"""Hung-peer detection in every worker: a heartbeat on the shared run directory and a watchdog
on step progress.

A thread of each worker rewrites ``workers/heartbeat-rank<r>.json`` (rank, node, pid, step,
wall time) every few seconds. It goes on beating while its worker waits in a collective, and
stops when the process is stopped (SIGSTOP), killed, or its node is lost: the launch names
those ranks from the files (``silent_ranks``). The same thread watches step progress: when no
step ended within ``deadline()`` it writes every thread's stack to ``logs/stall-rank<r>.log``,
notes the stall in ``workers/stall-rank<r>.json`` and ends the process, so a worker stuck in
I/O or a deadlock fails like a lost one, within minutes instead of the libraries' 30.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

from addertrain.errors import EXIT_TEMPFAIL

FLOOR_S = 60.0  # a watchdog bound never below this, unless distributed.step_timeout_s is
FACTOR = 10.0  # times the slowest recent step
RECENT = 20  # steps the bound is scaled to
REPORTS = "workers"  # shared with launch/nodes.py (its per-rank reports)
LOGS = "logs"


def deadline(timeout_s: float, recent_steps) -> float:
    """Seconds a step may take: ``timeout_s`` until steps were measured, then scaled to the
    slowest recent one, within [min(FLOOR_S, timeout_s), timeout_s]."""
    if not recent_steps:
        return timeout_s
    return min(timeout_s, max(FLOOR_S, FACTOR * max(recent_steps)))


def beat_interval(timeout_s: float) -> float:
    return min(5.0, timeout_s / 10)


def heartbeat_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / REPORTS / f"heartbeat-rank{rank}.json"


def stall_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / REPORTS / f"stall-rank{rank}.json"


def stall_log(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LOGS / f"stall-rank{rank}.log"


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


class Watchdog:
    """``with Watchdog(...) as dog:`` around the step loop; ``dog.beat(step)`` after each step,
    ``with dog.long("evaluation"):`` around work of unknown length (bounded by ``timeout_s``).
    ``announce``: also print the stall line (the local executor, where this process is the
    launch); Ray workers leave the line to the launch."""

    def __init__(self, run_dir: Path, rank: int, timeout_s: float, announce: bool = False):
        self.run_dir, self.rank, self.timeout_s = Path(run_dir), rank, timeout_s
        self.announce = announce
        self.node = socket.gethostname()
        self.step = 0
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._since = time.monotonic()
        self._long: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="addertrain-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        (self.run_dir / REPORTS).mkdir(parents=True, exist_ok=True)
        stall_file(self.run_dir, self.rank).unlink(missing_ok=True)
        self._since = time.monotonic()
        self._heartbeat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self, step: int) -> None:
        now = time.monotonic()
        self._recent.append(now - self._since)
        self.step, self._since = step, now

    @contextlib.contextmanager
    def long(self, what: str):
        self._long = what
        try:
            yield
        finally:
            self._long, self._since = None, time.monotonic()  # not a step's time

    def bound(self) -> float:
        return self.timeout_s if self._long else deadline(self.timeout_s, self._recent)

    def _watch(self) -> None:
        while not self._stop.wait(beat_interval(self.timeout_s)):
            waited = time.monotonic() - self._since
            self._heartbeat()
            if waited > self.bound():
                self._stalled(waited)

    def _heartbeat(self) -> None:
        record = {
            "rank": self.rank,
            "node": self.node,
            "pid": os.getpid(),
            "step": self.step,
            "time": time.time(),
        }
        with contextlib.suppress(OSError):  # a full or flaky disk must not end training here
            _write_json(heartbeat_file(self.run_dir, self.rank), record)

    def _stalled(self, waited: float) -> None:
        where = self._long or f"step {self.step + 1}"
        log = stall_log(self.run_dir, self.rank)
        frames = sys._current_frames()
        with contextlib.suppress(OSError):
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"{time.strftime('%F %T')} rank {self.rank} on {self.node} (pid ")
                f.write(f"{os.getpid()}): no progress for {waited:.0f} s in {where}\n")
                for thread in threading.enumerate():
                    if thread.ident in frames and thread is not self._thread:
                        f.write(f"\n-- thread {thread.name}\n")
                        f.write("".join(traceback.format_stack(frames[thread.ident])))
            _write_json(
                stall_file(self.run_dir, self.rank),
                {
                    "rank": self.rank,
                    "node": self.node,
                    "step": self.step,
                    "where": where,
                    "waited_s": round(waited),
                    "log": str(log),
                },
            )
        if self.announce:
            print(
                f"addertrain: error: rank {self.rank} on {self.node} made no progress for "
                f"{waited:.0f} s in {where} (distributed.step_timeout_s={self.timeout_s:g}); "
                f"stopped, the last checkpoint is kept: run the same command again to continue "
                f"(stacks in {log})",
                file=sys.stderr,
                flush=True,
            )
        # Only the process can leave a stuck C call (a collective, a read): the others then
        # fail in their collectives and the run ends through its failure path.
        os._exit(EXIT_TEMPFAIL)


def read_heartbeats(run_dir: Path) -> dict[int, dict]:
    out = {}
    for path in (Path(run_dir) / REPORTS).glob("heartbeat-rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            out[record["rank"]] = record
    return out


def read_stalls(run_dir: Path) -> dict[int, dict]:
    out = {}
    for path in (Path(run_dir) / REPORTS).glob("stall-rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            out[record["rank"]] = record
    return out


def silent_ranks(beats: dict[int, dict], timeout_s: float) -> dict[int, float]:
    """Ranks whose heartbeat stopped well before the others' (stopped, killed, node lost):
    rank -> seconds of silence before the last beat of any rank."""
    if len(beats) < 2:
        return {}
    newest = max(b["time"] for b in beats.values())
    gap = 2.5 * beat_interval(timeout_s)
    return {r: newest - b["time"] for r, b in beats.items() if newest - b["time"] > gap}
