"""What the launch says when Ray Train gives up on the workers: one line with the cause, the
fix or the checkpoint the run continues from and how, and the path of a log in the run
directory with every rank's traceback and the heartbeats (addertrain/watchdog.py).

Which failure it was is read from three sources: Ray's error for each rank (a lost actor, a
health check that timed out, or the worker's own exception), the heartbeats (a rank whose
heartbeat stopped before the others' was stopped, killed or lost with its node; the others
only saw it go) and the watchdog's stall reports (a rank that made no progress)."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from addertrain import watchdog
from addertrain.config import Config
from addertrain.errors import (
    EXIT_FAILED,
    EXIT_TEMPFAIL,
    RunStopped,
    UserError,
    describe,
    root_cause,
)

# Ray's words for a worker that is gone or does not answer (not the worker's own error)
LOST = ("ActorDiedError", "ActorUnavailableError", "NodeDiedError", "WorkerHealthCheckFailedError")
UNRESPONSIVE = ("WorkerHealthCheckTimeoutError",)
# Ray Train's words for workers it could not place
PLACEMENT = ("WorkerGroupStartupTimeoutError", "InsufficientClusterResourcesError")


def on_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ


def continue_command() -> str:
    """This launch's command line as the user continues it: ``--resume`` back to its default
    (auto), since a checkpoint path into a run directory with checkpoints is refused."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--resume="):
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        args.append(a)
    return shlex.join(["addertrain", *args])


def resume_note(run_dir: Path) -> str:
    step = latest_step(run_dir)
    where = (
        f"from the checkpoint of step {step}"
        if step is not None
        else "from the start (no checkpoint yet)"
    )
    how = "the Slurm job requeues itself" if on_slurm() else f"continue with `{continue_command()}`"
    return f"it resumes {where}: {how}"


def write_log(run_dir: Path, error: BaseException, beats: dict, stalls: dict) -> Path:
    path = Path(run_dir) / watchdog.LOGS / f"failure-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"{time.strftime('%F %T')} {continue_command()}\n"]
    for rank, err in sorted(getattr(error, "worker_failures", {}).items()):
        parts.append(f"\n== rank {rank}: {type(root_cause(err)).__name__}\n{err}\n")
    cause = getattr(error, "controller_failure", None)
    if cause is not None:
        parts.append(f"\n== controller\n{cause}\n")
    parts.append("\n== " + "".join(traceback.format_exception(error)))
    now = time.time()
    for rank, b in sorted(beats.items()):
        parts.append(
            f"heartbeat rank {rank} on {b['node']} (pid {b['pid']}): step {b['step']}, "
            f"{now - b['time']:.0f} s ago\n"
        )
    for rank, s in sorted(stalls.items()):
        parts.append(f"stall rank {rank}: {s}\n")
    path.write_text("".join(parts))
    return path


def _where(rank: int, beats: dict) -> str:
    b = beats.get(rank)
    return f"rank {rank} on {b['node']}" if b else f"rank {rank}"


def latest_step(run_dir: Path) -> int | None:
    from addertrain import checkpoint

    latest = checkpoint.latest(run_dir)
    return checkpoint.read_meta(latest)["step"] if latest else None


def _step(beats: dict, run_dir: Path) -> str:
    """Where the run was: the furthest step of any rank's heartbeat or of the latest
    checkpoint (a heartbeat may be a beat behind)."""
    steps = [b["step"] for b in beats.values()] + [latest_step(run_dir) or 0]
    return f" after step {max(steps)}" if beats else ""


def on_dead_nodes(run_dir: Path, dead: list[str]) -> set[int]:
    """Ranks whose worker report (launch/nodes.py: "host (ip)") names a node Ray lists as dead."""
    from addertrain.launch.nodes import REPORTS

    ranks = set()
    for path in (Path(run_dir) / REPORTS).glob("rank*.json"):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if any(f"({ip})" in report.get("node", "") for ip in dead):
            ranks.add(report["rank"])
    return ranks


def explain(error: BaseException, cfg: Config, cluster_has: str, dead: list[str]) -> Exception:
    """The one-line exception for a Ray Train failure; ``cluster_has``: what the cluster's
    alive nodes hold now, ``dead``: the addresses of the nodes Ray lists as dead."""
    run_dir = cfg.run_dir()
    failures = getattr(error, "worker_failures", None)
    bad_input = [e for _, e in sorted((failures or {}).items()) if isinstance(e, UserError)]
    if bad_input:  # the other ranks' errors follow from it
        return UserError(str(bad_input[0]))
    d = cfg.distributed
    beats, stalls = watchdog.read_heartbeats(run_dir), watchdog.read_stalls(run_dir)
    log = write_log(run_dir, error, beats, stalls)
    silent = watchdog.silent_ranks(beats, d.step_timeout_s)
    gone = on_dead_nodes(run_dir, dead)
    if failures is None:  # the controller's: placing a (new) worker group failed
        cause = root_cause(getattr(error, "controller_failure", error))
        if type(cause).__name__ not in PLACEMENT:
            return RunStopped(f"Ray Train failed: {str(cause).splitlines()[0]} (details in {log})")
        wanted = f"{d.workers} workers ({d.cpus_per_worker:g} CPU, {d.gpus_per_worker:g} GPU each)"
        waited = f"within distributed.replacement_timeout_s={d.replacement_timeout_s:g} s"
        if beats:  # the run had trained: a restart after a loss found no replacement
            lost = sorted(gone | set(silent))
            who = ", ".join(_where(r, beats) for r in lost) or "a worker"
            return RunStopped(
                f"{who} was lost{_step(beats, run_dir)} and no replacement joined {waited} "
                f"(the cluster has {cluster_has}, the run needs {wanted}); {resume_note(run_dir)} "
                f"(details in {log})",
                EXIT_TEMPFAIL,
            )
        return placement_failure(
            f"Ray could not place {wanted} {waited}: the cluster has {cluster_has}; add nodes "
            "or lower distributed.workers"
        )
    lost = {
        r: e
        for r, e in failures.items()
        if type(root_cause(e)).__name__ in LOST + UNRESPONSIVE and r not in stalls
    }
    lost.update({r: None for r in gone | set(silent) if r not in stalls and r not in lost})
    if lost:
        what = "; ".join(
            f"{_where(r, beats)} "
            + (
                "was lost (its process or node died)"
                if r in gone or (e is not None and type(root_cause(e)).__name__ in LOST)
                else f"stopped responding (no heartbeat for {silent.get(r, 0):.0f} s: the "
                "process is stopped or hung, or its node is lost)"
            )
            for r, e in sorted(lost.items())
        )
        return RunStopped(
            f"{what}{_step(beats, run_dir)}; {resume_note(run_dir)} (details in {log})",
            EXIT_TEMPFAIL,
        )
    own = {}
    for r, e in sorted(failures.items()):
        found = describe(e, str(e))
        if found:
            own[r] = found[0]
    if own:
        r, line = next(iter(own.items()))
        return RunStopped(
            f"{_where(r, beats)} failed{_step(beats, run_dir)}: {line} (full traceback in {log})",
            EXIT_FAILED,
        )
    if stalls:
        r, s = sorted(stalls.items())[0]
        return RunStopped(
            f"{_where(r, beats)} made no progress for {s['waited_s']} s in {s['where']} "
            f"(distributed.step_timeout_s={d.step_timeout_s:g}; its stacks are in {s['log']}); "
            f"{resume_note(run_dir)} (details in {log})",
            EXIT_TEMPFAIL,
        )
    r, e = sorted(failures.items())[0]
    first = str(root_cause(e)).strip().splitlines()[:1] or [type(e).__name__]
    return RunStopped(
        f"the workers lost contact with each other (rank {r}: {first[0][:200]}); "
        f"{resume_note(run_dir)} (details in {log})",
        EXIT_TEMPFAIL,
    )


def placement_failure(message: str) -> Exception:
    """Resources that are not there: under Slurm the job requeues (it may get other nodes);
    elsewhere it is the request to change."""
    return RunStopped(message, EXIT_TEMPFAIL) if on_slurm() else UserError(message)
