"""Trackers: console lines + metrics.jsonl, a real offline wandb run read back from disk,
wandb resume without replayed steps, and the online-without-key error."""

import json
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ltrain.tracking import ConsoleTracker, NoneTracker, TrackingError, WandbTracker, build_tracker

CONFIG = {"model": {"d_model": 64}, "optim": {"lr": 0.001}}


def tracking(**kw):
    """A TrackingConfig stand-in (the dataclass lives in ltrain.config)."""
    return SimpleNamespace(**{"backend": "wandb", "project": "ltrain-test", "mode": "offline",
                              "entity": None, "tags": ["test"], **kw})


def read_records(path: Path):
    """Yield the protobuf records of a .wandb file.

    wandb 0.31 ships no Python reader (the old wandb.sdk.internal.datastore is gone),
    so this parses its LevelDB-style log directly: a 7-byte file header (":W&B", magic,
    version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last). A block with under 7 bytes left is padding.
    """
    from wandb.proto import wandb_internal_pb2

    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            break  # zero fill or a chunk still being written: the end for now
        parts = (b"" if kind in (1, 2) else parts) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(parts)


def finished_records(path: Path, timeout: float = 10.0) -> list:
    """The records of a .wandb file once it ends with the run's exit record.

    run.finish() can return before wandb's service process has written the last
    records, so wait for them rather than read a half-written file.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_records(path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.05)


def read_run(run_dir: Path, run_id: str):
    """(history rows, config) from every offline directory of run_id, oldest first.

    A resumed offline run writes a new offline-run-<time>-<id> directory (with a -1
    suffix when started in the same second); `wandb sync` uploads them all into one run.
    """
    history, config = [], {}
    for path in sorted(run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb")):
        for rec in finished_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in rec.history.item})
            elif kind in ("run", "config"):
                update = rec.run.config.update if kind == "run" else rec.config.update
                config.update({i.key: json.loads(i.value_json) for i in update})
    return history, config


def test_console_tracker_writes_line_and_jsonl(tmp_path, capsys):
    tracker = build_tracker(tracking(backend="console"), rank=0, run_dir=str(tmp_path))
    assert isinstance(tracker, ConsoleTracker) and tracker.run_id is None
    tracker.log({"loss": 2.5, "tokens_per_s": 12345.0}, step=10)
    tracker.log({"loss": 2.25, "tokens_per_s": 12000.0}, step=20)
    tracker.finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 10, "loss": 2.5, "tokens_per_s": 12345.0},
                    {"step": 20, "loss": 2.25, "tokens_per_s": 12000.0}]
    assert "step 10 | loss 2.5 | tokens_per_s 12,345" in capsys.readouterr().out


@pytest.mark.parametrize("backend,rank", [("none", 0), ("console", 1), ("wandb", 3)])
def test_none_tracker_off_rank0_or_backend_none(tmp_path, backend, rank):
    tracker = build_tracker(tracking(backend=backend), rank=rank, run_dir=str(tmp_path))
    assert type(tracker) is NoneTracker and tracker.run_id is None
    assert list(tmp_path.iterdir()) == []


def test_wandb_online_without_key_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(TrackingError, match="set WANDB_API_KEY .*tracking.mode=offline") as err:
        build_tracker(tracking(mode="online"), rank=0, run_dir=str(tmp_path))
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # failed before wandb or metrics.jsonl started


def test_wandb_offline_logs_history_config_and_resumes(tmp_path):
    run_dir = str(tmp_path)
    tracker = build_tracker(tracking(), rank=0, run_dir=run_dir, config=CONFIG)
    assert isinstance(tracker, WandbTracker) and tracker.run_id
    run_id = tracker.run_id
    for step in (1, 2, 3):
        tracker.log({"loss": 10.0 - step, "lr": 0.1}, step=step)
    tracker.finish()

    history, config = read_run(tmp_path, run_id)
    assert [(row["_step"], row["loss"]) for row in history] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert config["model"] == {"d_model": 64} and config["optim"] == {"lr": 0.001}

    # Resume from a checkpoint at step 1: steps 2 and 3 are replayed and must be skipped.
    tracker = build_tracker(tracking(), rank=0, run_dir=run_dir, config=CONFIG, run_id=run_id)
    assert tracker.run_id == run_id
    for step in (2, 3, 4, 5):
        tracker.log({"loss": 100.0 + step, "lr": 0.1}, step=step)
    tracker.finish()

    # Offline, the resumed part goes to a second directory under the same run id.
    assert len(list(tmp_path.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))) == 2
    history, _ = read_run(tmp_path, run_id)
    assert [(row["_step"], row["loss"]) for row in history] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0)]
    # The console side still shows every step, replayed ones included.
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 2, 3, 4, 5]


def test_training_run_resumes_the_same_wandb_run(tmp_path):
    """A real offline training run, stopped at step 20 and continued to 30: one wandb
    run id (saved in the checkpoint), each step logged once, history read back."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "LTRAIN_RUN_ID": "wb", "PYTHONUNBUFFERED": "1"}
    common = ["tracking=wandb", "attention=dense", f"trainer.out_dir={tmp_path}", "trainer.log_every=5", "trainer.ckpt_every=10",
              "trainer.progress=false", "model.n_layers=2", "data.micro_batch_size=2", "data.seq_len=128"]
    for steps in (20, 30):
        proc = subprocess.run([sys.executable, "-m", "ltrain.train", f"trainer.max_steps={steps}", *common],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "wb"
    manifest = json.loads((run_dir / "checkpoints" / "step_00000030" / "ltrain_complete.json").read_text())
    run_id = manifest["tracker_run_id"]
    assert run_id
    history, config = read_run(run_dir, run_id)
    assert [h["_step"] for h in history] == [5, 10, 15, 20, 25, 30]
    assert config["model"]["name"] == "tiny"
