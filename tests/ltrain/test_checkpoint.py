"""Checkpoints: atomic visibility, damage detection, and bit-exact continuation
after SIGKILL with the real DeepSpeed engine (ZeRO 1 and 3, 1 and 2 ranks)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ltrain.checkpoint import MANIFEST, CheckpointError, _prune, candidates, verify

REPO = Path(__file__).resolve().parents[2]
SINGLE = (sys.executable, "-m", "ltrain.train")
TWO_RANKS = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ltrain.train")
BASE = ["trainer.max_steps=40", "trainer.log_every=1", "trainer.ckpt_every=10", "trainer.progress=false",
        "model.n_layers=2", "data.micro_batch_size=4", "data.seq_len=128"]


def fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(b"x" * 100)
    if complete:
        (path / MANIFEST).write_text(json.dumps({"step": step, "files": {"model.pt": 100}}))
    return path


def test_incomplete_and_truncated_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="incomplete"):
        verify(fake_ckpt(tmp_path, 5, complete=False))
    good = fake_ckpt(tmp_path, 10)
    assert verify(good)["step"] == 10
    (good / "model.pt").write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match="model.pt has 10 bytes, expected 100"):
        verify(good)


def test_auto_tries_newest_first_and_prune_keeps_last(tmp_path):
    for step in (10, 20, 30):
        fake_ckpt(tmp_path, step)
    fake_ckpt(tmp_path, 25, complete=False)
    assert [Path(p).name for p in candidates(str(tmp_path), "auto")] == [
        "step_00000030", "step_00000025", "step_00000020", "step_00000010"]
    _prune(str(tmp_path), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000030"]


def run(launcher, out: Path, extra=(), env_extra=None):
    env = {**os.environ, "LTRAIN_RUN_ID": "ckpt", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([*launcher, f"trainer.out_dir={out}", *BASE, *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def losses(out: Path) -> dict[int, float]:
    """step -> loss, the last record of each step winning (a resumed run re-logs replayed steps)."""
    rows = [json.loads(x) for x in (out / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_after(proc, out: Path, step: int) -> None:
    metrics = out / "ckpt" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(x)["step"] >= step for x in metrics.read_text().splitlines()):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        time.sleep(0.01)
    raise AssertionError("training never reached the kill step")


def check_continuity(tmp_path, launcher, zero_stage):
    extra = [f"parallel.zero_stage={zero_stage}"]
    full = run(launcher, tmp_path / "full", extra)
    killed = run(launcher, tmp_path / "killed", extra)
    kill_after(killed, tmp_path / "killed", 13)
    partial = losses(tmp_path / "killed")
    assert max(partial) < 40, "the run finished before it was killed"
    resumed_out = finish(run(launcher, tmp_path / "killed", extra))
    finish(full)
    assert "resumed from" in resumed_out
    ref, got = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 41))
    mismatched = {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}
    assert not mismatched, f"losses differ after resume (step: (uninterrupted, resumed)): {mismatched}"


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_sigkill_and_resume_is_bit_exact_one_rank(tmp_path, zero_stage):
    check_continuity(tmp_path, SINGLE, zero_stage)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_sigkill_and_resume_is_bit_exact_two_ranks(tmp_path, zero_stage):
    check_continuity(tmp_path, TWO_RANKS, zero_stage)


def test_unwritable_checkpoint_dir_stops_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run(SINGLE, tmp_path, [f"trainer.ckpt_dir={blocker}/ckpts"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert out.strip().splitlines()[-1].startswith("ltrain: checkpoint error: trainer.ckpt_dir=")


@pytest.mark.slow
def test_resume_into_more_ranks_and_longer_sequences(tmp_path):
    """ZeRO-0 (replicated optimizer state): 1 rank at seq 128 -> 2 ranks at seq 256."""
    extra = ["parallel.zero_stage=0", "trainer.max_steps=10"]
    finish(run(SINGLE, tmp_path, extra))
    out = finish(run(TWO_RANKS, tmp_path, ["parallel.zero_stage=0", "trainer.max_steps=20", "data.seq_len=256"]))
    assert "resumed from" in out and "saved on 1 ranks with 2 ranks" in out
    rows = losses(tmp_path)
    assert sorted(rows) == list(range(1, 21)) and all(v == v for v in rows.values())


@pytest.mark.slow
def test_zero1_checkpoint_on_other_world_size_is_refused_clearly(tmp_path):
    finish(run(SINGLE, tmp_path, ["parallel.zero_stage=1", "trainer.max_steps=10"]))
    proc = run(TWO_RANKS, tmp_path, ["parallel.zero_stage=1", "trainer.max_steps=20"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "ltrain: checkpoint error:" in out and "holds ZeRO-1 optimizer shards for 1 ranks" in out
