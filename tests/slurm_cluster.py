"""A real Slurm cluster for the tests: one node on localhost, or one node per network
namespace (tests/netns.py).

Debian's munge, slurmctld, slurmd and slurm-client (installed on first use when
missing and running as root), configured in a private temp dir: munged with its
own key and socket, ``slurmctld -D`` and ``slurmd -D -N NODE`` as child
processes that are stopped by PID afterwards. Job processes are tracked by
process tree (no cgroups), which is what a container or CI machine allows.

Across namespaces each node is a host: slurmctld and the clients on the first, one slurmd
on each with its own spool, log and PID file (``%n`` in slurm.conf), and its own node-local
folder (``node_local``, a private mount of the same path), as /tmp is on separate machines.
munged stays outside: its socket is a file, which every namespace reaches.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "munge", "slurm-client")
PROGRAMS = (
    "munged",
    "munge",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "scancel",
    "squeue",
    "sinfo",
)
DAEMONS = ("munged", "slurmctld", "slurmscriptd", "slurmd", "slurmstepd")
NODE = "localhost"
# Logical CPUs of the test node (config_overrides lets it exceed the real count):
# enough for a Ray head with two 1-CPU training workers on a 2-core machine.
NODE_CPUS = max(4, os.cpu_count() or 1)


_INSTANCES = itertools.count()


class ClusterError(RuntimeError):
    pass


def install() -> None:
    """Install the Debian packages if any program is missing (needs root and apt-get)."""
    if not (missing := _missing()):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterError(
            f"Slurm programs {missing} are missing; install the Debian packages "
            f"{' '.join(PACKAGES)} (the tests do it themselves when run as root with apt-get)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # test processes running side by side (pytest-xdist) install one at a time: apt holds a
    # lock of its own and would refuse the second, which finds the programs there once it waited
    with open("/tmp/addertrain-test-slurm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _missing():
            return
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        ):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                raise ClusterError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")


def _missing() -> list[str]:
    return [p for p in PROGRAMS if not shutil.which(p, path=_sbin_path())]


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_env(entry: str):
    """(PID, /proc folder) of every other live process with ``entry`` (``NAME=value``) in its
    environment."""
    needle = entry.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            yield int(proc.name), proc


def daemon_pids(conf: Path) -> set[int]:
    """PIDs of the live munge/Slurm daemon processes of the cluster configured by ``conf``.

    Every one of them carries ``SLURM_CONF=conf`` in its environment (slurmstepd too, which
    daemonizes away from slurmd), so the clusters of other test processes running at the same
    time are never counted. Zombies do not count: in a container whose PID 1 does not reap,
    an exited slurmstepd stays a zombie but holds nothing.
    """
    pids = set()
    for pid, proc in _with_env(f"SLURM_CONF={conf}"):
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
        if comm in DAEMONS and state != "Z":
            pids.add(pid)
    return pids


def job_pids(job_id: int | str) -> list[int]:
    """PIDs of live processes that belong to a Slurm job (SLURM_JOB_ID in their environment).

    Every process of a job inherits it, Ray's raylet, GCS and worker processes included,
    whatever their command line says.
    """
    return [pid for pid, _ in _with_env(f"SLURM_JOB_ID={job_id}")]


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost, or on ``hosts`` (one slurmd each); ``env``
    points the Slurm clients at it, ``run`` runs them where slurmctld can be reached."""

    def __init__(self, hosts=None):
        self.hosts = list(hosts or [])
        # job IDs of their own: a job's processes are found by SLURM_JOB_ID (job_pids), and the
        # clusters of test processes running side by side would otherwise both count from 1
        self.first_job_id = (os.getpid() % 50000) * 1000 + 100 * next(_INSTANCES) + 1
        self.nodes = [(h.name, h.ip) for h in self.hosts] or [(NODE, "127.0.0.1")]
        self.dir = Path(tempfile.mkdtemp(prefix="addertrain-slurm-"))
        # short: Ray puts its sockets in the node-local folder (108-byte path limit)
        self.node_local = Path(tempfile.mkdtemp(prefix="atl", dir="/tmp")) if self.hosts else None
        # munged wants its socket folder reachable by every client: world-executable.
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        self.socket = self.dir / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=_sbin_path())
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if var != "SLURM_CONF":
                del self.env[var]

    # -- bring-up ---------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", self._on_first(["slurmctld", "-D", "-f", str(self.conf)]))
            self._wait(
                lambda: self.run("scontrol", "ping", check=False).returncode == 0,
                timeout,
                "slurmctld to answer scontrol ping",
            )
            for i, (name, _) in enumerate(self.nodes):
                cmd = ["slurmd", "-D", "-N", name, "-f", str(self.conf)]
                self._spawn(f"slurmd-{name}", self._on_node(i, cmd) if self.hosts else cmd)
            names = [name for name, _ in self.nodes]
            self._wait(
                lambda: all(self.node_state(n) == "idle" for n in names),
                timeout,
                f"nodes {', '.join(names)} to be idle",
            )
        except BaseException:
            self.stop()
            raise

    def _start_munge(self):
        d = self.socket.parent
        d.mkdir(mode=0o755)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.socket}",
                f"--pid-file={d / 'munged.pid'}",
                f"--log-file={self.dir / 'munged.log'}",
                f"--seed-file={d / 'munged.seed'}",
                "--num-threads=2",
            ],
        )

        def works():
            cred = self.run("munge", "-n", "-S", str(self.socket), check=False)
            return (
                cred.returncode == 0
                and subprocess.run(
                    ["unmunge", "-S", str(self.socket)],
                    input=cred.stdout,
                    capture_output=True,
                    text=True,
                ).returncode
                == 0
            )

        self._wait(works, 30, "munged to encode and decode a credential")

    def _on_first(self, cmd: list[str]) -> list[str]:
        return self.hosts[0].command(cmd) if self.hosts else cmd

    def _on_node(self, i: int, cmd: list[str]) -> list[str]:
        """``cmd`` on host ``i`` with its own copy of ``node_local`` (a private mount, which
        slurmd passes on to every job step it starts)."""
        own = self.dir / f"local-{self.nodes[i][0]}"
        own.mkdir()
        return self.hosts[i].command(cmd, mounts={own: self.node_local})

    def _write_conf(self):
        for sub in ["state"] + [f"spool-{name}" for name, _ in self.nodes]:
            (self.dir / sub).mkdir()
        d = self.dir
        first, first_ip = self.nodes[0]
        controller = first if not self.hosts else f"{first}({first_ip})"
        nodes = "\n".join(
            f"NodeName={name} NodeAddr={ip} CPUs={NODE_CPUS} State=UNKNOWN"
            for name, ip in self.nodes
        )
        self.conf.write_text(f"""\
ClusterName=addertrain-test
FirstJobId={self.first_job_id}
SlurmctldHost={controller}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool-%n"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd-%n.pid"}
SlurmctldLogFile={d / "slurmctld.log"}
SlurmdLogFile={d / "slurmd-%n.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
{nodes}
PartitionName=debug Nodes={",".join(name for name, _ in self.nodes)} Default=YES \
MaxTime=INFINITE State=UP
""")

    def _spawn(self, name, cmd):
        log = open(self.dir / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def _wait(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterError(
                        f"{name} exited with {p.returncode} while waiting for {what}\n{self.logs()}"
                    )
            if ready():
                return
            time.sleep(0.3)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    # -- use ----------------------------------------------------------------------------
    def run(self, *cmd, check=True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(
            self._on_first(list(cmd)),
            env=kw.pop("env", self.env),
            capture_output=True,
            text=True,
            **kw,
        )
        if check and r.returncode:
            raise ClusterError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def node_state(self, node: str = NODE) -> str:
        r = self.run("sinfo", "-h", "-N", "-n", node, "-o", "%T", check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    def job(self, job_id) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...); {} once purged."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode:
            return {}
        fields = {}
        for item in r.stdout.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def logs(self, tail: int = 3000) -> str:
        out = []
        names = ["munged.log", "slurmctld.log", "slurmctld.out"]
        for node, _ in self.nodes:
            names += [f"slurmd-{node}.log", f"slurmd-{node}.out"]
        for name in names:
            p = self.dir / name
            if p.exists():
                out.append(f"--- {name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- teardown -----------------------------------------------------------------------
    def stop(self) -> list[int]:
        """Cancel every job, stop the daemons by PID; returns the daemon PIDs still alive."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user", "root", check=False, timeout=30)
            deadline = time.monotonic() + 60
            while (
                time.monotonic() < deadline
                and self.run("squeue", "-h", check=False, timeout=30).stdout.strip()
            ):
                time.sleep(0.5)
        for name in [f"slurmd-{node}" for node, _ in self.nodes] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        left = daemon_pids(self.conf)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.node_local:
            shutil.rmtree(self.node_local, ignore_errors=True)
        return sorted(left)
