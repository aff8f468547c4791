"""A private single-node Ray cluster for one run.

- Loopback only: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray takes 127.0.0.1 as the node
  address, and its GCS, raylet, object manager and worker servers bind to it alone (otherwise
  they listen on every interface).
- Its own token: ``RAY_AUTH_MODE=token`` with a fresh random ``RAY_AUTH_TOKEN`` (the highest
  precedence source), so ``~/.ray/auth_token`` is neither read nor written.
- A private temp dir: Ray makes its temp dir world-writable, so it lies inside a mode-700
  folder of ours, removed when the cluster stops.
- Pinned: ``RAY_ADDRESS`` names this cluster in the driver and, through a worker setup hook,
  in every Ray worker process (Ray Train's placement-group cleaner looks the cluster up
  again and would otherwise die on finding another Ray instance on the host).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

LOOPBACK = "127.0.0.1"
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Ray Train's tracebacks of a failure, in its controller and workers: the launch reports the
# failure in one line and writes every rank's traceback to the run's log (launch/failures.py).
FAILURE_LOGGERS = (
    "ray.train.v2._internal.execution.controller.controller",  # "Error in control loop"
    "ray.train.v2._internal.util",  # "Error in training function"
    # the process group cannot shut down once a worker died
    "ray.train.v2._internal.callbacks.backend_setup",
)


# Ray Train's hint to the autoscaler: when the machine is loaded it times out and is logged
# with its traceback, though Ray retries it and calls it safe to ignore; one line is kept.
AUTOSCALER_HINT_LOGGER = (
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
)


class _OneLine(logging.Filter):
    """A record's exception as the end of its line, not as a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {error})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


class _HideTracebacks(logging.Filter):
    """Records about an exception (logged with it, or while it is being handled)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.exc_info and sys.exc_info()[1] is None


def worker_setup() -> None:
    """Runs in every Ray worker process of a run's job (embedded cluster or ``--address``)
    before its first task."""
    import ray

    # This worker's own cluster is the one any Ray lookup finds.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    # Ray Train's placement-group cleaner asks the state API every second whether the
    # controller lives, and warns each time it cannot. The state API needs the dashboard,
    # which ray[train] does not install and the embedded cluster does not start: there the
    # cleaner can never work (and ray.shutdown removes the placement groups anyway); a cluster
    # with the dashboard (ray[default]) answers and the cleaner works, silently.
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)
    for name in FAILURE_LOGGERS:
        logging.getLogger(name).addFilter(_HideTracebacks())
    logging.getLogger(AUTOSCALER_HINT_LOGGER).addFilter(_OneLine())


@contextlib.contextmanager
def _environ(**values: str):
    """Set environment variables (inherited by the processes Ray starts), restore on exit."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def cluster(num_cpus: int, num_gpus: int | None, **init_kwargs):
    """Start the cluster, yield its GCS address, stop it and remove its files."""
    private = Path(tempfile.mkdtemp(prefix="ray-"))  # mode 700
    try:
        with _environ(
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
        ):
            import ray

            # "local": a new cluster even if RAY_ADDRESS names another one
            ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=False,
                _temp_dir=str(private / "r"),
                runtime_env={"worker_process_setup_hook": f"{__name__}.worker_setup"},
                **init_kwargs,
            )
            try:
                address = ray.get_runtime_context().gcs_address
                if not address.startswith(LOOPBACK + ":"):
                    # Ray was imported before the switch above was set: refuse to serve on
                    # every interface rather than carry on.
                    raise RuntimeError(
                        f"the embedded Ray cluster came up on {address}, not "
                        f"{LOOPBACK}; import ray only after embedded_ray.cluster"
                    )
                with _environ(RAY_ADDRESS=address):
                    yield address
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(private, ignore_errors=True)
