"""A real Slurm on this machine for the tests: munged, slurmctld and two slurmd (nodeA, nodeB) on the loopback.

Debian's slurm-wlm and munge are installed with apt when missing (as run/setup.sh installs Open MPI;
cluster users bring their own Slurm). Both slurmd run here under two node names, each on its own port
(``slurmd -N``), so a job of ``--nodes=2`` gets two nodes, two ``SLURM_NODEID`` and per-node local ranks.
Everything (config, keys, state, logs, sockets) lives in one temporary directory, and every daemon is
stopped when the context ends, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from megatron_glm.training.distributed import free_port

NODES = ("nodeA", "nodeB")
CPUS_PER_NODE = 2
PACKAGES = ("slurm-wlm", "munge")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a local Slurm (why is in the message)."""


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt when their daemons are missing (needs root and apt-get)."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(
            "slurmctld/slurmd/munged are not installed, and they can be installed only as root with apt-get "
            f"(this is uid {os.geteuid()}, apt-get {'found' if shutil.which('apt-get') else 'missing'}): "
            f"run `apt-get install {' '.join(PACKAGES)}` as root"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")


def _config(root: Path, ctld_port: int, node_ports: dict[str, int]) -> str:
    lines = [
        "ClusterName=glmtest",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s).
        f"AuthInfo=socket={root}/munge.sock,cred_expire=5",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        "ProctrackType=proctrack/pgid",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "InactiveLimit=0",
        "KillWait=10",
        "MinJobAge=300",
        "SchedulerParameters=sched_interval=1",
        "MessageTimeout=30",
    ]
    for node, port in node_ports.items():
        lines.append(
            f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN"
        )
    lines.append(f"PartitionName=test Nodes={','.join(node_ports)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


class SlurmCluster:
    """A running local cluster; ``env`` is the environment for sbatch/squeue/scontrol against it."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self._daemons: list[subprocess.Popen] = []

    def command(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> str:
        """Run a Slurm client command against this cluster; its stdout, or RuntimeError with stderr."""
        env = self.env if env is None else {**env, "SLURM_CONF": self.env["SLURM_CONF"]}
        result = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def logs(self) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def job_state(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as key -> value (JobState, Restarts, ExitCode, ...)."""
        out = self.command("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(0.2)

    def _start(self, *command: str) -> None:
        errors = self.root / f"{Path(command[0]).name}-{len(self._daemons)}.err"
        with open(errors, "w") as stderr:  # the daemon keeps its own copy of the descriptor
            self._daemons.append(
                subprocess.Popen(
                    list(command),
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                )
            )

    def start(self) -> None:
        root = self.root
        (root / "state").mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        # munged refuses a world-writable socket directory unless forced; the temp dir is private anyway.
        self._start(
            "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={root}/munge.sock",
            f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed",
        )  # fmt: skip
        self.wait_for(lambda: (root / "munge.sock").exists(), 20, "munged's socket")
        node_ports = {node: free_port() for node in NODES}
        (root / "slurm.conf").write_text(_config(root, free_port(), node_ports))
        self._start("slurmctld", "-D", "-i", "-f", str(root / "slurm.conf"))
        for node in NODES:
            self._start("slurmd", "-D", "-N", node, "-f", str(root / "slurm.conf"))

        def nodes_idle() -> bool:
            for daemon in self._daemons:
                if daemon.poll() is not None:
                    raise SlurmUnavailable(f"{daemon.args[0]} exited ({daemon.returncode}):\n{self.logs()}")
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                states = self.command("sinfo", "-h", "-N", "-o", "%N %t", timeout=10).split()
                return states.count("idle") == len(NODES)
            return False

        self.wait_for(nodes_idle, 60, "both nodes to be idle")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            jobs = self.command("squeue", "-h", "-o", "%i", timeout=10).split()
            if jobs:
                self.command("scancel", *jobs, timeout=10)
        # slurmd first (they end their job steps), then the controller, then munged.
        for daemon in reversed(self._daemons):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGTERM)
        for daemon in reversed(self._daemons):
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()


@contextlib.contextmanager
def local_slurm(root: Path) -> Iterator[SlurmCluster]:
    """Install (if needed) and start a two-node Slurm in ``root``; stop every daemon on exit."""
    ensure_installed()
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
