"""Signals to ltrain-train (ltrain/preempt.py): real signals to real processes.
SIGTERM saves a complete checkpoint and exits, Ctrl-C exits at the step boundary
without saving, a second Ctrl-C at once. (SIGUSR1 with SLURM's requeue runs on a
real SLURM in tests/launch/test_slurm.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ltrain import preempt
from ltrain.checkpoint import verify

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["model=tiny", "attention=dense", "data=synthetic", "optim=adamw", "tracking=console", "model.n_layers=2",
         "data.seq_len=128", "data.micro_batch_size=2", "parallel.zero_stage=1", "trainer.device=cpu",
         "trainer.max_steps=400", "trainer.log_every=1", "trainer.ckpt_every=0", "trainer.progress=false"]

SIGNALS = """
import os, signal
from ltrain import preempt
preempt.install()
os.kill(os.getpid(), signal.SIGTERM)
print(preempt.flags(), flush=True)
os.environ["SLURM_JOB_ID"] = "7"
os.kill(os.getpid(), signal.SIGUSR1)
print(preempt.flags(), flush=True)
os.kill(os.getpid(), signal.SIGINT)
print(preempt.flags(), preempt.decide(preempt.flags()), flush=True)
os.kill(os.getpid(), signal.SIGINT)
print("still running", flush=True)
"""


def test_signals_set_flags_and_a_second_ctrl_c_ends_the_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-c", SIGNALS], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGINT, proc.stderr
    assert proc.stdout.splitlines() == [
        "[1.0, 0.0, 0.0]", "[1.0, 0.0, 1.0]",
        "[1.0, 1.0, 1.0] Stop(save=True, requeue=True, reason='SIGTERM, SIGUSR1, SIGINT')"]
    assert proc.stderr.count("ltrain: interrupted: stopping after this step without saving") == 1


def test_decision_from_flags_summed_over_ranks():
    assert preempt.decide([0.0, 0.0, 0.0]) is None
    # Another rank got Ctrl-C: everyone stops, nobody saves.
    assert preempt.decide([0.0, 1.0, 0.0]) == preempt.Stop(save=False, requeue=False, reason="a signal to another rank")
    # Any rank asking to save makes all save (a collective), whatever else was asked.
    stop = preempt.decide([2.0, 1.0, 0.0])
    assert stop.save and not stop.requeue


def start(out: Path, run_id: str) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
           "LTRAIN_RUN_ID": run_id, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ltrain.train", *TRAIN, f"trainer.out_dir={out}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def signal_after_step(proc: subprocess.Popen, metrics: Path, sig: int, step: int = 3, group: bool = False) -> None:
    """Send `sig` once `step` steps are logged; to the process group (a terminal's Ctrl-C) with `group`."""
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    (os.killpg if group else os.kill)(proc.pid, sig)


@pytest.mark.slow
def test_sigterm_saves_and_ctrl_c_exits_cleanly(tmp_path):
    """Two runs side by side: SIGTERM to one, Ctrl-C (SIGINT) to the other."""
    term, intr = start(tmp_path, "term"), start(tmp_path, "intr")
    signal_after_step(term, tmp_path / "term" / "metrics.jsonl", signal.SIGTERM)
    signal_after_step(intr, tmp_path / "intr" / "metrics.jsonl", signal.SIGINT)
    term_out, _ = term.communicate(timeout=300)
    intr_out, _ = intr.communicate(timeout=300)
    assert term.returncode == 0 and intr.returncode == 0, term_out[-3000:] + intr_out[-3000:]
    assert "Traceback" not in term_out + intr_out

    last = json.loads((tmp_path / "term" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 3 <= last < 400
    assert f"stopped at step {last} on SIGTERM: checkpoint saved" in term_out
    ckpts = tmp_path / "term" / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{last:08d}"
    assert [p.name for p in ckpts.glob("step_*")] == [f"step_{last:08d}"]
    assert verify(str(ckpts / f"step_{last:08d}"))["step"] == last  # complete: manifest and every file

    last = json.loads((tmp_path / "intr" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 3 <= last < 400
    assert f"stopped at step {last} on SIGINT: not saved" in intr_out
    assert intr_out.count("ltrain: interrupted:") == 1
    assert not list((tmp_path / "intr" / "checkpoints").glob("step_*"))
