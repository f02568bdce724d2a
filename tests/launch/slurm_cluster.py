"""A real SLURM cluster on this host for the launch tests: munged, slurmctld and
two slurmd "nodes" (n1, n2: one CPU each, distinct ports, one host).

Debian's slurm-wlm and munge are installed when absent (the test machines run
as root and apt works). Everything the daemons write (state, spool, logs, pid
files, the munge key and socket) lives under one temporary directory, on ports
picked free at start, so nothing collides with a site's own SLURM.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.multiproc import free_port

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


class SlurmSetupError(RuntimeError):
    """SLURM could not be installed or started; the message says what and shows the logs."""


def install() -> None:
    """apt-get install slurm-wlm and munge unless their programs are already there."""
    if all(shutil.which(p) or os.path.exists(f"/usr/sbin/{p}") for p in DAEMONS):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SlurmSetupError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}; the SLURM tests need root and "
                              f"apt):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def host_address() -> str:
    """This host's first non-loopback address: the rendezvous must not be on 127.0.0.1."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return next((a for a in out if ":" not in a and not a.startswith("127.")), "127.0.0.1")


@dataclass
class Cluster:
    root: Path
    conf: Path
    procs: list = field(default_factory=list)

    @property
    def env(self) -> dict:
        """The environment for sbatch/scontrol (and so for the jobs: sbatch exports it)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PYTHONUNBUFFERED": "1"}

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60, **kw)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | os.PathLike | None = None) -> str:
        """Submit; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, cwd=cwd).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict:
        """Poll until the job is in one of `states` (or a final state); AssertionError on time-out."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states or info["JobState"] in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f}s "
                                     f"(wanted {sorted(states)})\n{self.logs()}")
            time.sleep(0.2)

    def wait_done(self, job_id: str, timeout: float) -> dict:
        return self.wait_state(job_id, FINAL_STATES, timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted((self.root / "log").glob("*.log")))


def write_conf(root: Path, ctld_port: int, node_ports: list[int]) -> Path:
    """slurm.conf for this host: what Debian's 22.05 slurmd runs with in a container
    (no cgroups: linuxproc process tracking, no task plugin) and requeue enabled."""
    host, addr = socket.gethostname().split(".")[0], host_address()
    nodes = "\n".join(f"NodeName=n{i + 1} NodeHostname={host} NodeAddr={addr} Port={port} CPUs=1 State=UNKNOWN"
                      for i, port in enumerate(node_ports))
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=ltraintest
SlurmctldHost={host}({addr})
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
MinJobAge=600
KillWait=10
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def start(root: Path) -> Cluster:
    """Start munged, slurmctld and both slurmd; returns once both nodes are idle."""
    install()
    for sub in ("munge", "state", "log", "spool/n1", "spool/n2"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o755)  # munged wants its socket directory searchable
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    ports = [free_port() for _ in range(3)]
    cluster = Cluster(root, write_conf(root, ports[0], ports[1:]))
    sbin = "/usr/sbin"
    commands = [
        [f"{sbin}/munged", "--foreground", "--force", f"--socket={root}/munge/socket", f"--key-file={key}",
         f"--log-file={root}/log/munged.log", f"--pid-file={root}/munge/munged.pid",
         f"--seed-file={root}/munge/seed"],
        [f"{sbin}/slurmctld", "-D", "-c", "-f", str(cluster.conf)],
        [f"{sbin}/slurmd", "-D", "-f", str(cluster.conf), "-N", "n1"],
        [f"{sbin}/slurmd", "-D", "-f", str(cluster.conf), "-N", "n2"],
    ]
    try:
        for i, cmd in enumerate(commands):
            log = open(root / "log" / f"{Path(cmd[0]).name}-{i}.out", "w")
            cluster.procs.append(subprocess.Popen(cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT))
            if i == 0:
                _wait(lambda: (root / "munge" / "socket").exists(), 10, "munged's socket", cluster)
        _wait(lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.split() == ["idle"], 40,
              "both nodes idle", cluster)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _wait(ready, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise SlurmSetupError(f"SLURM did not start: waiting for {what}"
                                  + (f", {', '.join(dead)} exited" if dead else f" for {timeout:.0f}s")
                                  + f"\n{cluster.logs()}")
        time.sleep(0.2)


def stop(cluster: Cluster) -> None:
    """Cancel what is still queued or running, then end the daemons this module started."""
    jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
    if jobs:
        cluster.run("scancel", *jobs, check=False)
        deadline = time.monotonic() + 30
        while cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split() and time.monotonic() < deadline:
            time.sleep(0.5)
    for proc in reversed(cluster.procs):  # slurmd before slurmctld before munged
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
