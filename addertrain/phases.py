"""Where a run's wall time goes: named phases timed by the launcher and by rank 0.

The launcher times what happens before and around the workers (the dataset check, the
cluster start, the workers' start, the shutdown); rank 0 times its own part, from its worker
function's start to its summary. Both use wall-clock stamps (``time.time()``), so the launcher
can place rank 0's start and end on its own timeline even though rank 0 is another process.
Phases never overlap, so they add up to at most the wall time; ``untimed`` is the rest.

In ``result.json``: ``phases`` {name: seconds} in :data:`ORDER`, ``phase_counts`` {name: how
often} for the repeated ones (training steps, evaluations, checkpoints), and
``wall_s``, which the phases and ``untimed`` add up to.
"""

from __future__ import annotations

import contextlib
import time

# Timeline order; the launcher's phases and rank 0's interleave so.
ORDER = (
    "dataset",  # launcher: build (if the recipe can), check and list the dataset
    "cluster",  # launcher: the embedded Ray cluster's start (or joining one)
    "workers",  # launcher: from the cluster up to rank 0's worker function running
    "worker_setup",  # rank 0: node checks, kernel warm-up, process group, imports
    "data_pipelines",  # rank 0: the training, evaluation and recalibration loaders
    "engine",  # rank 0: the model, the optimizer and the DeepSpeed engine
    "resume",  # rank 0: loading a checkpoint to continue from
    "first_step",
    "training",  # every later step (the first one pays for lazy set-up)
    "evaluation",  # BatchNorm re-estimation included
    "checkpoint",
    "export",  # the final model, and the plot of the metrics
    "shutdown",  # launcher: rank 0's summary to the cluster stopped
)
UNTIMED = "untimed"
LABELS = {"first_step": "first step", "worker_setup": "setup", "data_pipelines": "data"}
COUNTED = {"training": "steps", "evaluation": "x", "checkpoint": "x"}


class Phases:
    """Seconds and counts per phase for one process."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.ends: dict[str, float] = {}  # the wall-clock stamp each phase last ended at

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        if name not in ORDER:
            raise ValueError(f"unknown phase {name!r}; add it to phases.ORDER")
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, seconds)
        self.counts[name] = self.counts.get(name, 0) + count

    def since(self, name: str, start: float) -> float:
        """Add the time from the wall-clock stamp ``start`` to now; returns now."""
        now = time.time()
        self.add(name, now - start)
        self.ends[name] = now
        return now

    @contextlib.contextmanager
    def timed(self, name: str):
        start = time.time()
        try:
            yield
        finally:
            self.since(name, start)

    def record(self) -> dict:
        """The ``phases`` and ``phase_counts`` entries of a result.json."""
        return {
            "phases": {n: round(self.seconds[n], 3) for n in ORDER if n in self.seconds},
            "phase_counts": {n: self.counts[n] for n in COUNTED if n in self.counts},
        }


def combine(launcher: dict, worker: dict, wall: float) -> dict:
    """The run's phases from the launcher's and rank 0's records (``Phases.record()``), with
    the rest of ``wall`` as ``untimed``. A phase in both (one process did both parts, the
    local executor) is counted once."""
    seconds = {**worker.get("phases", {}), **launcher.get("phases", {})}
    seconds = {n: seconds[n] for n in ORDER if n in seconds}
    seconds[UNTIMED] = round(max(0.0, wall - sum(seconds.values())), 3)
    counts = {**worker.get("phase_counts", {}), **launcher.get("phase_counts", {})}
    return {"phases": seconds, "phase_counts": counts}


def describe(name: str, seconds: float, counts: dict) -> str:
    """``2.1 s``, with how often for a repeated phase: ``61.0 s (344 steps)``, ``3.2 s (3x)``."""
    text = f"{seconds:.1f} s"
    if name in COUNTED and name in counts:
        unit = COUNTED[name]
        text += f" ({counts[name]}x)" if unit == "x" else f" ({counts[name]} {unit})"
    return text


def summary_line(result: dict) -> str:
    """``phases: cluster 2.1 s | workers 3.0 s | ... | untimed 0.4 s`` from a result.json."""
    counts = result.get("phase_counts", {})
    parts = [f"{LABELS.get(n, n)} {describe(n, s, counts)}" for n, s in result["phases"].items()]
    return "phases: " + " | ".join(parts)
