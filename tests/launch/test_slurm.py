"""launch/slurm.sbatch on a real SLURM (tests/launch/slurm_cluster.py): the launch
logic piece by piece, a 2-node job against torchrun, pre-emption with requeue
and bit-exact resume, a rendezvous that cannot happen, and bad input."""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import host_address
from tests.ltrain.test_tracking import read_run
from tests.ltrain.test_train import read_metrics

REPO = Path(__file__).resolve().parents[2]
SBATCH = str(REPO / "launch" / "slurm.sbatch")
# The smallest run that still trains: 2 ranks (dp=2, ZeRO-1), CPU fp32, every step logged.
TRAIN = ["model=tiny", "attention=dense", "data=synthetic", "optim=adamw", "tracking=console",
         "model.n_layers=2", "data.seq_len=128", "data.micro_batch_size=2", "parallel.dp=2",
         "parallel.cp=1", "parallel.zero_stage=1", "trainer.device=cpu", "trainer.precision=fp32",
         "trainer.max_steps=40", "trainer.log_every=1", "trainer.ckpt_every=0", "trainer.progress=false"]


def lib(call: str, env: dict) -> subprocess.CompletedProcess:
    """Run one launch/slurm_lib.sh function the way the scripts do (env.sh first)."""
    script = f"set -euo pipefail; source launch/env.sh; source launch/slurm_lib.sh; {call}"
    return subprocess.run(["/bin/bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)


def one_error_line(proc, kind: str) -> str:
    """The failure was exactly one `ltrain: <kind> error:` line, exit 2, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"ltrain: {kind} error: "), proc.stderr
    return lines[0]


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}


# --- the launch logic, one function at a time (multi-node paths included) ---

def test_first_host_and_its_address(slurm):
    assert lib("slurm_first_host 'gpu[007-009],cpu1'", slurm.env).stdout == "gpu007\n"
    # Node names need not resolve as hosts: the rendezvous takes SLURM's NodeAddr.
    assert lib("slurm_node_addr n2", slurm.env).stdout == f"{host_address()}\n"
    assert lib("slurm_node_addr not-a-node", slurm.env).stdout == "not-a-node\n"
    no_scontrol = {**slurm.env, "PATH": "/nonexistent", "LTRAIN_HOME": str(REPO)}
    line = one_error_line(lib("slurm_first_host n1", no_scontrol), "slurm")
    assert "scontrol not found" in line


def test_rendezvous_host_refuses_what_other_nodes_cannot_reach(slurm):
    assert lib("ltrain_rdzv_host n1 2", slurm.env).stdout == f"{host_address()}\n"
    loopback = {**slurm.env, "LTRAIN_RDZV_HOST": "127.0.0.1"}
    assert lib("ltrain_rdzv_host n1 1", loopback).stdout == "127.0.0.1\n"  # one node: fine
    line = one_error_line(lib("ltrain_rdzv_host n1 2", loopback), "rendezvous")
    assert "loopback 127.0.0.1" in line and "LTRAIN_RDZV_HOST" in line
    missing = {**slurm.env, "LTRAIN_RDZV_HOST": "no-such-host.invalid"}
    assert "does not resolve" in one_error_line(lib("ltrain_rdzv_host n1 2", missing), "rendezvous")


def test_port_comes_from_the_job_id(slurm):
    assert lib("ltrain_rdzv_port 12345; ltrain_rdzv_port 40001", slurm.env).stdout == "32345\n20001\n"
    assert lib("ltrain_rdzv_port 12345", {**slurm.env, "LTRAIN_RDZV_PORT": "29999"}).stdout == "29999\n"


@pytest.mark.parametrize("env,want", [
    ({"LTRAIN_PROCS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, "3"),
    ({"SLURM_GPUS_ON_NODE": "8"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, "4"),
])
def test_processes_per_node(slurm, env, want):
    assert lib("ltrain_procs_per_node", {**slurm.env, **env}).stdout == want + "\n"


def test_no_gpus_and_no_process_count_is_one_line(slurm):
    env = {k: v for k, v in slurm.env.items() if not k.startswith(("SLURM_GPUS", "LTRAIN_PROCS"))}
    assert "LTRAIN_PROCS_PER_NODE" in one_error_line(lib("ltrain_procs_per_node", env), "slurm")


def test_torchrun_arguments_per_node(slurm):
    env = {**slurm.env, "LTRAIN_NNODES": "4", "LTRAIN_PROCS_PER_NODE": "8", "LTRAIN_RDZV_HOST": "10.0.0.7",
           "LTRAIN_RDZV_PORT": "21234", "LTRAIN_RDZV_TIMEOUT": "90", "LTRAIN_RUN_ID": "slurm-1234"}
    for node, is_host in (("0", "true"), ("3", "false")):
        args = lib("ltrain_torchrun_args", {**env, "SLURM_NODEID": node}).stdout.split()
        assert args == ["--nnodes=4", "--nproc_per_node=8", f"--node_rank={node}", "--rdzv_backend=c10d",
                        "--rdzv_endpoint=10.0.0.7:21234", "--rdzv_id=slurm-1234",
                        f"--rdzv_conf=is_host={is_host},join_timeout=90,read_timeout=90", "--max_restarts=0"]


def test_requeued_job_resumes_auto(slurm):
    show = 'ltrain_train_args {} model=tiny trainer.resume=none; printf "%s\\n" "${{LTRAIN_ARGS[@]}}"'
    assert lib(show.format(0), slurm.env).stdout.split() == ["model=tiny", "trainer.resume=none"]
    # Hydra takes the last value of a key, so the requeued job continues the run.
    assert lib(show.format(2), slurm.env).stdout.split() == ["model=tiny", "trainer.resume=none",
                                                             "trainer.resume=auto"]


# --- bad input: one line each, nothing left behind ---

def test_outside_slurm_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", SBATCH, *TRAIN, f"trainer.out_dir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
    assert "submit it: usage: sbatch --nodes=N" in one_error_line(proc, "slurm")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_node_count_that_does_not_match_dp_is_one_line(slurm, tmp_path):
    job = slurm.sbatch("--nodes=2", f"--output={tmp_path}/job.out", SBATCH, *TRAIN, "parallel.dp=4",
                       f"trainer.out_dir={tmp_path}/out", env={"LTRAIN_PROCS_PER_NODE": "1"})
    info = slurm.wait_done(job, 120)
    out = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", out
    errors = [ln for ln in out.splitlines() if ln.startswith("ltrain:") and "error" in ln]
    assert errors == ["ltrain: config error: parallel.dp=4 is invalid: world size 2 / parallel.cp 1 gives 2; "
                      "set 2 or -1 (launch: 2 node(s) x 1 process(es) per node)"], out
    assert "Traceback" not in out and not (tmp_path / "out").exists()  # no rank started, no run dir, no lock


# --- real jobs ---

class Reference:
    """The same run under launch/torchrun.sh on one node, started at once and read when
    needed, so that it overlaps the SLURM job it is compared with."""

    def __init__(self, out: Path):
        self.out, self._losses = out, None
        self.proc = subprocess.Popen(["bash", "launch/torchrun.sh", "2", *TRAIN, f"trainer.out_dir={out}"],
                                     cwd=REPO, env={**os.environ, "LTRAIN_RUN_ID": "ref"}, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def losses(self) -> dict[int, float]:
        if self._losses is None:
            log, _ = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, log[-3000:]
            self._losses = losses(self.out / "ref")
            assert sorted(self._losses) == list(range(1, 41))
        return self._losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("torchrun"))
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


@pytest.mark.slow
def test_two_node_job_matches_torchrun(slurm, tmp_path, reference):
    """sbatch --nodes=2: one torchrun per node, one rank each, rendezvous on n1's address."""
    job = slurm.sbatch("--nodes=2", f"--output={tmp_path}/job.out", SBATCH, *TRAIN,
                       f"trainer.out_dir={tmp_path}/out", env={"LTRAIN_PROCS_PER_NODE": "1"})
    torchrun_losses = reference.losses()
    info = slurm.wait_done(job, 300)
    out = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", out + slurm.logs()
    assert info["NodeList"] == "n[1-2]"
    assert f"2 node(s) x 1 rank(s), rendezvous {host_address()}:" in out
    run_dir = tmp_path / "out" / f"slurm-{job}"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [run_dir.name]  # one run dir for all ranks
    assert "world 2 = dp 2 x cp 1" in (run_dir / "train.log").read_text()
    assert losses(run_dir) == torchrun_losses


@pytest.mark.slow
def test_preempted_job_saves_requeues_and_continues_bit_exact(slurm, tmp_path, reference):
    """SIGUSR1 to every rank, as `--signal=USR1@N` sends it before the time limit: the job
    checkpoints, requeues itself, resumes, and ends with the uninterrupted run's losses."""
    job = slurm.sbatch("--nodes=1", f"--output={tmp_path}/job.out", SBATCH, *TRAIN, "tracking=wandb",
                       "tracking.mode=offline", f"trainer.out_dir={tmp_path}/out", env={"LTRAIN_PROCS_PER_NODE": "2"})
    run_dir = tmp_path / "out" / f"slurm-{job}"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            (tmp_path / "job.out").read_text() + slurm.logs()
        time.sleep(0.05)
    slurm.run("scancel", "--signal=USR1", job)  # the steps' processes, not the batch shell: what --signal does
    info = slurm.wait_state(job, {"PENDING"}, 120)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (tmp_path / "job.out").read_text()
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip SLURM's requeue hold
    info = slurm.wait_done(job, 300)
    out = (tmp_path / "job.out").read_text()  # --open-mode=append: both starts
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out + slurm.logs()

    stopped = re.search(r"stopped at step (\d+) on SIGUSR1: checkpoint saved", out)
    assert stopped and f"requeued SLURM job {job}" in out, out
    assert "Traceback" not in out, out  # torchrun and wandb stay quiet through the requeue
    step = int(stopped.group(1))
    assert 3 <= step < 40
    assert f"(start 2)" in out and f"resumed from" in out and f"step_{step:08d}" in out, out
    assert [p.name for p in (tmp_path / "out").iterdir()] == [run_dir.name]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 41))
    torchrun_losses = reference.losses()
    mismatched = {s: (torchrun_losses[s], got[s]) for s in got if got[s] != torchrun_losses[s]}
    assert not mismatched, f"(uninterrupted, pre-empted) losses differ: {mismatched}"
    # One wandb run across both starts (offline: one directory per start, one run id).
    ids = {p.name for p in run_dir.glob("wandb/offline-run-*/run-*.wandb")}
    assert len(ids) == 1 and len(list(run_dir.glob("wandb/offline-run-*"))) == 2, ids
    history, _ = read_run(run_dir, ids.pop()[len("run-"):-len(".wandb")])
    assert [row["_step"] for row in history] == list(range(1, 41))


def test_unreachable_rendezvous_fails_with_one_line_in_bounded_time(slurm, tmp_path):
    """A rendezvous host the ranks cannot meet at (a TEST-NET-3 address, not the first
    node's): one line from the first node at once, srun ends the other node, the job fails."""
    start = time.monotonic()
    job = slurm.sbatch("--nodes=2", f"--output={tmp_path}/job.out", SBATCH, *TRAIN, f"trainer.out_dir={tmp_path}/out",
                       env={"LTRAIN_PROCS_PER_NODE": "1", "LTRAIN_RDZV_HOST": "203.0.113.1", "LTRAIN_RDZV_TIMEOUT": "8"})
    info = slurm.wait_done(job, 120)
    elapsed = time.monotonic() - start
    out = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "FAILED", out
    errors = [ln for ln in out.splitlines() if ln.startswith("ltrain: rendezvous error:")]
    assert errors == ["ltrain: rendezvous error: the rendezvous host 203.0.113.1 is not an address of the first "
                      f"node n1 ({os.uname().nodename}), which serves it; set LTRAIN_RDZV_HOST to one "
                      "of that node's addresses, or unset it"], out
    assert not (tmp_path / "out").exists()  # no rank started
    assert elapsed < 60, f"took {elapsed:.0f}s"


def test_other_nodes_give_up_on_an_unreachable_rendezvous_in_time(slurm):
    """The other nodes' side (slurm_node.sh): wait for node 0's store, give up after the time-out."""
    import socket

    with socket.socket() as server:
        server.bind(("", 0))
        server.listen()
        port = server.getsockname()[1]
        assert lib(f"ltrain_wait_for_endpoint {host_address()} {port} 5", slurm.env).returncode == 0
    # Nothing listens there any more (an unreachable host behaves alike, where a proxy
    # does not answer every address, as it does on this test machine).
    start = time.monotonic()
    assert lib(f"ltrain_wait_for_endpoint {host_address()} {port} 3", slurm.env).returncode == 1
    assert 3 <= time.monotonic() - start < 10
    assert lib(f"ltrain_is_local_address {host_address()}", slurm.env).returncode == 0
    assert lib("ltrain_is_local_address 203.0.113.1", slurm.env).returncode == 1
