"""Hosts for multi-node tests on one machine: network namespaces joined by a bridge.

Each host is a network namespace with its own network stack (loopback and one address in
10.203.X.0/24, X picked per test run), so Ray's GCS, raylets, object transfers and gloo, or
slurmd and slurmctld, talk across a real (virtual) network as between machines. Commands run
on a host also get its hostname (n0, n1, ...: a UTS namespace each) and a hosts file that
resolves every host's name to its address (mounted on /etc/hosts in a mount namespace of
their own), as a cluster's name service would. ``nsenter --net`` rather than ``ip netns
exec``: the latter remounts /sys, which hides the cgroup mounts slurmd needs. The filesystem
stays shared, as a cluster's shared filesystem would be. The bridge has no address: nothing
outside the namespaces can be reached from them, nor reach them.

Everything made here is removed by ``Hosts.close``, processes first (found by namespace,
each killed by PID), even when a test failed half-way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "atns"  # names of everything made here: atns<tag>-<i> namespaces, atns<tag> bridge
ETC_NETNS = Path("/etc/netns")
# sh -c 'SCRIPT' sh SRC DST [SRC DST ...] -- HOSTNAME CMD...: bind mounts, hostname, exec CMD
ON_HOST = """
while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 1; shift 2; done
hostname "$2" || exit 1
shift 2
exec "$@"
"""


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here: the reason, for a pytest skip."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def check_available() -> None:
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (ip netns add)")
    if not shutil.which("ip"):
        raise NetnsUnavailable(
            "the ip command (iproute2) is not installed: apt-get install iproute2"
        )
    probe = f"{PREFIX}probe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode:
        raise NetnsUnavailable(f"ip netns add is refused here: {r.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


@dataclass
class Host:
    name: str  # the node's name (n0, n1, ...), also its hostname for Slurm
    netns: str
    ip: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def command(self, cmd: list[str], mounts: dict[Path, Path] | None = None) -> list[str]:
        """``cmd`` run on this host: in its network namespace, under its hostname, with its
        hosts file, and each folder of ``mounts`` mounted on the path it maps to (private to
        ``cmd`` and its children)."""
        binds = [str(p) for src, dst in (mounts or {}).items() for p in (src, dst)]
        return [
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            "sh",
            "-c",
            ON_HOST,
            "sh",
            str(ETC_NETNS / self.netns / "hosts"),
            "/etc/hosts",
            *binds,
            "--",
            self.name,
            *cmd,
        ]

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(cmd), **kw)

    def start(self, cmd: list[str], log: Path, **kw) -> subprocess.Popen:
        """A long-running process on this host, its output in ``log``; stopped by ``close``."""
        with open(log, "ab") as out:
            p = subprocess.Popen(
                self.command(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )
        self.procs.append(p)
        return p

    def pids(self) -> list[int]:
        """Every process in this host's namespace (what it started, and their children)."""
        r = _ip("netns", "pids", self.netns, check=False)
        return [int(p) for p in r.stdout.split()]


class Hosts:
    """``count`` hosts n0, n1, ... at 10.203.X.1, .2, ... on one bridge."""

    def __init__(self, count: int):
        check_available()
        tag = os.getpid() % 100000
        self.subnet = f"10.203.{tag % 250 + 1}"
        self.bridge = f"{PREFIX}{tag}"
        self.hosts = [
            Host(f"n{i}", f"{PREFIX}{tag}-{i}", f"{self.subnet}.{i + 1}") for i in range(count)
        ]
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i, h in enumerate(self.hosts):
            outside, inside = f"{self.bridge}v{i}", f"{self.bridge}p{i}"
            _ip("netns", "add", h.netns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", h.netns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            inns = ["-n", h.netns]
            _ip(*inns, "link", "set", "lo", "up")
            _ip(*inns, "addr", "add", f"{h.ip}/24", "dev", inside)
            _ip(*inns, "link", "set", inside, "up")
        names = "".join(f"{h.ip} {h.name}\n" for h in self.hosts)
        for h in self.hosts:
            (ETC_NETNS / h.netns).mkdir(parents=True)
            (ETC_NETNS / h.netns / "hosts").write_text(f"127.0.0.1 localhost\n{names}")

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def close(self) -> list[int]:
        """Stop every process in the namespaces (TERM, then KILL after a grace period), remove
        the namespaces and the bridge; returns the PIDs that outlived a KILL."""
        pids = {pid for h in self.hosts for pid in h.pids()}
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                pids = {pid for h in self.hosts for pid in h.pids()}
                time.sleep(0.2)
        for i, h in enumerate(self.hosts):
            for p in h.procs:  # reap what this process started
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            # the pair goes with the namespace, but only once the kernel gets to it
            _ip("link", "del", f"{self.bridge}v{i}", check=False)
            _ip("netns", "del", h.netns, check=False)
            shutil.rmtree(ETC_NETNS / h.netns, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)
        return sorted(pids)
