"""Wait until the job's Ray cluster has all its nodes, or fail naming what is missing.

    python wait_for_nodes.py --address HOST:PORT [--nodes N] [--timeout S] [--watch PID ...]

Exit 0 once N nodes are alive (without --nodes: once the head's GCS port answers, which is
what a worker node waits for before its ray start); 1 on timeout, or as soon as a watched
process (the srun steps that run Ray) has exited, since the cluster can then never be
complete. Connecting needs the job's token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH), which
addertrain.sbatch exports.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


class Waiter:
    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.timeout

    def check(self, waiting_for: str) -> None:
        """Give up when a watched process died or the time is over."""
        dead = [pid for pid in self.args.watch if not running(pid)]
        if dead:
            fail(
                f"the Ray start step (pid {', '.join(map(str, dead))}) exited while waiting for "
                f"{waiting_for}; its error is in the job output above"
            )
        if time.monotonic() > self.deadline:
            fail(
                f"timed out after {self.args.timeout:g} s waiting for {waiting_for}; raise "
                "ADDERTRAIN_JOIN_TIMEOUT if the nodes are slow to start, otherwise see the Ray "
                "errors in the job output above"
            )


def fail(message: str) -> None:
    print(
        f"addertrain-slurm: error: {socket.gethostname()}: {message}", file=sys.stderr, flush=True
    )
    sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the Ray head, HOST:PORT")
    p.add_argument(
        "--nodes",
        type=int,
        help="how many nodes must join; without it, wait only for the head to listen",
    )
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait in all")
    p.add_argument("--watch", type=int, nargs="*", default=[], help="PIDs that must stay alive")
    args = p.parse_args()
    waiter = Waiter(args)
    host, _, port = args.address.rpartition(":")

    while not accepts(host, int(port)):
        waiter.check(f"the Ray head to listen at {args.address}")
        time.sleep(0.5)
    if args.nodes is None:
        return

    import ray

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    while True:
        joined = sorted(n["NodeManagerHostname"] for n in ray.nodes() if n["Alive"])
        if len(joined) >= args.nodes:
            print(
                f"addertrain-slurm: {time.strftime('%H:%M:%S')} all {args.nodes} Ray nodes "
                f"joined: {' '.join(joined)}",
                flush=True,
            )
            ray.shutdown()
            return
        waiter.check(
            f"{args.nodes} Ray nodes to join ({len(joined)} so far: {' '.join(joined) or 'none'})"
        )
        time.sleep(1)


if __name__ == "__main__":
    main()
