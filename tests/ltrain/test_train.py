"""`ltrain-train` end to end, as a user runs it: Hydra CLI, real DeepSpeed, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def run_cli(args, tmp_path, *, launcher=(sys.executable, "-m", "ltrain.train"), timeout=600):
    env = {**os.environ, "LTRAIN_RUN_ID": "test", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*launcher, f"trainer.out_dir={tmp_path}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return proc, tmp_path / "test"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_run_learns_and_writes_its_outputs(tmp_path):
    """The README's first command: the embedded default config (every kind in one
    model, sparse paths active), loss must fall, the summary names each layer."""
    proc, run_dir = run_cli([], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == 200
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.5 * first, f"loss did not fall enough: {first} -> {last}"
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] == r["grad_norm"] for r in rows)  # no NaN
    assert all(r["tflops_per_device"] > 0 and "mfu_pct" not in r for r in rows)  # a CPU has no peak: no MFU
    assert rows[-1]["attn/layer1/mode"] == "sparse"  # InfLLM-V2 past its dense_len
    assert 0 < rows[-1]["attn/layer0/block_fraction"] < 1  # S2's stripes leave pairs out
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == "tiny" and saved["trainer"]["run_name"] == "test"
    assert saved["attention"]["pattern"] == "SILD"
    from ltrain.engine import lr_lambda  # the lr logged at step s is the one step s trained with
    o = saved["optim"]
    for r in rows:
        factor = lr_lambda(r["step"] - 1, warmup_steps=o["warmup_steps"], max_steps=saved["trainer"]["max_steps"],
                           schedule=o["schedule"], min_lr_ratio=o["min_lr_ratio"])
        assert r["lr"] == pytest.approx(o["lr"] * factor, rel=1e-6), r
    out = proc.stdout + proc.stderr
    assert "step 200" in out
    assert out.count("MFU not reported: no peak FLOP/s known for a CPU; set trainer.peak_tflops=") == 1
    summary = out[out.index("done: 200 steps"):]
    assert "model TFLOP/s per device over the run" in summary.splitlines()[0], summary
    for line in ("layer 0: s2 (sparse), attended fraction", "layer 1: infllm_v2 (sparse), attended fraction",
                 "layer 2: linear", "layer 3: dense, attended fraction 1.000", f"run dir: {run_dir}"):
        assert line in summary, summary


@pytest.mark.slow  # a second CLI start-up (~25 s CPU); the default run above covers the TFLOP/s wiring
def test_peak_tflops_gives_mfu_of_the_model_flops(tmp_path):
    """trainer.peak_tflops: each logged row's MFU is its model TFLOP/s over the peak, and the
    TFLOP/s are the config's FLOPs per token times the row's tokens/s."""
    from omegaconf import OmegaConf

    from ltrain.config import TrainConfig
    from ltrain.flops import flops_per_token

    proc, run_dir = run_cli(["attention=dense", "model.n_layers=2", "data.seq_len=128", "trainer.max_steps=3",
                             "trainer.log_every=1", "trainer.ckpt_every=0", "trainer.peak_tflops=0.0001"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig),
                                              OmegaConf.load(run_dir / "config.yaml")))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["tflops_per_device"] == pytest.approx(flops_per_token(cfg, r) * r["tokens_per_s"] / 1e12, rel=1e-9)
        assert r["mfu_pct"] == pytest.approx(100 * r["tflops_per_device"] / 1e-4, rel=1e-9)
    out = proc.stdout + proc.stderr
    assert "MFU not reported" not in out
    assert "% over the run" in out[out.index("done: 3 steps"):].splitlines()[0]


def test_config_error_is_one_line_before_any_process_group(tmp_path):
    proc, run_dir = run_cli(["model.n_kv_heads=3"], tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("ltrain: config error: model.n_kv_heads=3")
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.slow
def test_torchrun_two_data_parallel_ranks(tmp_path):
    proc, run_dir = run_cli(
        ["attention=dense", "parallel.dp=2", "trainer.max_steps=20", "trainer.log_every=5"], tmp_path,
        launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", "-m", "ltrain.train"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert "dp 2 x cp 1" in (run_dir / "train.log").read_text()
