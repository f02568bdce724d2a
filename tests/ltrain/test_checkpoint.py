"""Checkpoints: atomic visibility, damage detection, and bit-exact continuation
after SIGKILL with the real DeepSpeed engine (ZeRO 1 and 3, 1 and 2 ranks)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ltrain.checkpoint import MANIFEST, CheckpointError, _prune, candidates, verify
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[2]
SINGLE = (sys.executable, "-m", "ltrain.train")
TWO_RANKS = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ltrain.train")
BASE = ["attention=dense", "trainer.max_steps=40", "trainer.log_every=1", "trainer.ckpt_every=10", "trainer.progress=false",
        "model.n_layers=2", "data.micro_batch_size=4", "data.seq_len=128"]


def fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(b"x" * 100)
    if complete:
        digest = hashlib.sha256(b"x" * 100).hexdigest()
        (path / MANIFEST).write_text(json.dumps({"step": step, "files": {"model.pt": {"size": 100, "sha256": digest}}}))
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


def test_prune_keeps_the_checkpoint_just_saved_over_a_newer_damaged_one(tmp_path):
    """Resumed from step 10 because step 30 is damaged, saved step 20 with keep_last=1:
    step 30 is newer by number, but step 20 (just saved, hashed) is the good one."""
    for step in (10, 20, 30):
        fake_ckpt(tmp_path, step)
    (tmp_path / "step_00000030" / "model.pt").write_bytes(b"y" * 100)  # same size, other bytes
    _prune(str(tmp_path), keep_last=1, protect=str(tmp_path / "step_00000020"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000030"]
    with pytest.raises(CheckpointError, match="model.pt has the right size but not its recorded sha256"):
        verify(tmp_path / "step_00000030")
    assert verify(tmp_path / "step_00000020")["step"] == 20


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


def _step(engine, loader):
    from ltrain.loss import lm_loss

    batch = loader.next_batch()
    loss, _, _ = lm_loss(engine(batch["input_ids"]), batch["labels"])
    engine.backward(loss)
    engine.step()


def _weights(engine):
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}


def _train_save_step(rank, world, ckpt_dir, zero_stage):
    """1 rank: 3 steps, checkpoint, 1 more step -> fp32 weights after step 4."""
    from ltrain import checkpoint

    engine, loader = _engine_and_loader(zero_stage, micro_batch=2)
    for _ in range(3):
        _step(engine, loader)
    checkpoint.save(engine, ckpt_dir, step=3, tokens=0, loader=loader, tracker_run_id=None, keep_last=1,
                    extra={"zero_stage": zero_stage})
    _step(engine, loader)
    return _weights(engine)


def _resume_resharded_step(rank, world, ckpt_dir, zero_stage):
    """2 ranks: resume the 1-rank checkpoint, take step 4 on the same global batch."""
    from ltrain import checkpoint

    path = checkpoint.choose(ckpt_dir, "auto")
    universal = checkpoint.universal_for(path, zero_stage)
    engine, loader = _engine_and_loader(zero_stage, micro_batch=1, load_universal=universal is not None)
    checkpoint.load(engine, loader, path, universal)
    _step(engine, loader)
    return universal is not None, _weights(engine)


def _engine_and_loader(zero_stage, micro_batch, load_universal=False, lr=None):
    from ltrain.config import TrainConfig
    from ltrain.data.loader import build_loader
    from ltrain.engine import build_engine
    from ltrain.models.transformer import Transformer
    from ltrain.parallel.topology import init_topology

    cfg = TrainConfig()
    cfg.model.n_layers, cfg.data.seq_len, cfg.data.micro_batch_size = 2, 128, micro_batch
    cfg.parallel.zero_stage = zero_stage
    cfg.optim.lr = cfg.optim.lr if lr is None else lr
    topo = init_topology(cp=1)
    torch.manual_seed(0)
    engine = build_engine(Transformer(cfg.model, cfg.attention), cfg, load_universal=load_universal)
    return engine, build_loader(cfg.data, seed=1, dp_rank=topo.dp_rank, dp_size=topo.dp)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_shards_reshard_to_another_world_size(tmp_path, zero_stage):
    """ZeRO shards saved on 1 rank load on 2 through a DeepSpeed universal checkpoint, and
    the next step (same global batch, split over the 2 ranks) gives the 1-rank run's weights:
    weights and Adam moments came along (lost moments would move each weight by ~lr = 1e-3)."""
    (want,) = run_ranks(_train_save_step, 1, str(tmp_path), zero_stage)
    for converted, got in run_ranks(_resume_resharded_step, 2, str(tmp_path), zero_stage):
        assert converted
        for name, w in want.items():
            torch.testing.assert_close(got[name], w, rtol=0, atol=2e-6, msg=name)


@pytest.mark.slow
def test_cli_resumes_zero1_run_on_more_ranks(tmp_path):
    finish(run(SINGLE, tmp_path, ["parallel.zero_stage=1", "trainer.max_steps=10"]))
    out = finish(run(TWO_RANKS, tmp_path, ["parallel.zero_stage=1", "trainer.max_steps=14", "data.micro_batch_size=2"]))
    assert "converting its ZeRO shards to a universal checkpoint for 2" in out and "resumed from" in out
    rows = losses(tmp_path)
    assert sorted(rows) == list(range(1, 15)) and all(v == v for v in rows.values())


@pytest.mark.slow
def test_zero3_checkpoint_on_another_world_size_is_refused(tmp_path):
    finish(run(SINGLE, tmp_path, ["parallel.zero_stage=3", "trainer.max_steps=10"]))
    proc = run(TWO_RANKS, tmp_path, ["parallel.zero_stage=3", "trainer.max_steps=14"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "ltrain: checkpoint error:" in out and "ZeRO-3 state cannot be resharded exactly" in out


def _resume_with_new_lr(rank, world, ckpt_dir):
    """Train 3 steps at the default lr, checkpoint, resume with optim.lr halved."""
    from ltrain import checkpoint
    from ltrain.engine import apply_config_lr

    engine, loader = _engine_and_loader(1, micro_batch=2)
    for _ in range(3):
        _step(engine, loader)
    checkpoint.save(engine, ckpt_dir, step=3, tokens=0, loader=loader, tracker_run_id=None, keep_last=1,
                    extra={"zero_stage": 1})
    old_lr = engine.lr_scheduler.base_lrs[0]
    same, _ = _engine_and_loader(1, micro_batch=2)
    checkpoint.load(same, loader, checkpoint.choose(ckpt_dir, "auto"))
    unchanged = apply_config_lr(same, old_lr)

    engine, loader = _engine_and_loader(1, micro_batch=2, lr=old_lr / 2)
    checkpoint.load(engine, loader, checkpoint.choose(ckpt_dir, "auto"))
    restored = list(engine.lr_scheduler.base_lrs)
    saved = apply_config_lr(engine, old_lr / 2)
    factor = engine.lr_scheduler.lr_lambdas[0]
    now = engine.get_lr()
    _step(engine, loader)
    return dict(old_lr=old_lr, unchanged=unchanged, restored=restored, saved=saved, now=now,
                now_want=old_lr / 2 * factor(3), after=engine.get_lr(), after_want=old_lr / 2 * factor(4))


def test_changed_lr_applies_on_resume(tmp_path):
    """DeepSpeed restores the checkpoint's base lr; ltrain puts the config's back (the train loop warns)."""
    r = run_ranks(_resume_with_new_lr, 1, str(tmp_path))[0]
    assert r["unchanged"] is None  # same config: nothing touched, so resume stays bit-exact
    assert r["restored"] == [r["old_lr"]] * 2 and r["saved"] == r["restored"]
    assert r["now"] == [r["now_want"]] * 2 and r["after"] == [r["after_want"]] * 2

