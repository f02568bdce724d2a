"""The `infllm_v2` attention kind: registry wiring, bit-identity with the dense
kind below dense_len, stats, config errors, and a short CLI training run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ltrain.attention.context import AttnContext
from ltrain.attention.infllm_v2 import InfLLMV2Config, validate_section
from ltrain.attention.registry import build_attention, known_kinds
from ltrain.config import AttentionConfig, ModelConfig
from ltrain.nn.rope import rope_tables

REPO = Path(__file__).resolve().parents[3]
PRESET = OmegaConf.load(REPO / "conf/attention/infllm_v2.yaml").infllm_v2


def cfgs(**overrides):
    attn = AttentionConfig(pattern="I", infllm_v2=InfLLMV2Config(**{**PRESET, **overrides}))
    return ModelConfig(), attn


def context(b, n, head_dim, cp_group=None):
    positions = torch.arange(n).expand(b, n)
    cos, sin = rope_tables(positions, head_dim)
    return AttnContext(cos=cos, sin=sin, cp_group=cp_group)


def layers(n, **overrides):
    torch.manual_seed(0)
    model_cfg, attn_cfg = cfgs(**overrides)
    dense = build_attention("dense", 3, model_cfg, attn_cfg)
    infllm = build_attention("infllm_v2", 3, model_cfg, attn_cfg)
    infllm.load_state_dict(dense.state_dict())
    x = torch.randn(2, n, model_cfg.dim)
    return dense, infllm, x, context(2, n, model_cfg.dim // model_cfg.n_heads)


def test_registered_as_I():
    assert known_kinds()["infllm_v2"] == "I"


def test_at_dense_len_bit_identical_to_dense_kind():
    dense, infllm, x, ctx = layers(PRESET.dense_len)
    got = infllm(x, ctx)
    assert torch.equal(got, dense(x, ctx))
    assert ctx.stats == {"attn/layer3/mode": "dense", "attn/layer3/block_fraction": 1.0}
    got.sum().backward()
    grads = [p.grad.clone() for p in infllm.parameters()]
    dense(x, ctx).sum().backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, dense.parameters()))


def test_past_dense_len_same_weights_run_sparse():
    dense, infllm, x, ctx = layers(2 * PRESET.dense_len)
    out = infllm(x, ctx)
    assert ctx.stats["attn/layer3/mode"] == "sparse"
    assert 0 < ctx.stats["attn/layer3/block_fraction"] < 1
    assert out.shape == x.shape and not torch.allclose(out, dense(x, ctx))


@pytest.mark.parametrize("key,value", [("topk", 2), ("kernel_stride", 16), ("block_size", 18), ("window_size", 8)])
def test_validate_names_the_key(key, value):
    with pytest.raises(ValueError, match=rf"attention\.infllm_v2\.{key}={value}"):
        validate_section(OmegaConf.create({**PRESET, key: value}))
    with pytest.raises(ValueError, match=rf"attention\.infllm_v2\.{key}={value}"):
        build_attention("infllm_v2", 0, *cfgs(**{key: value}))


def test_paper_preset_is_valid():
    validate_section(InfLLMV2Config())
    validate_section(OmegaConf.load(REPO / "conf/attention/infllm_v2-paper.yaml").infllm_v2)


def test_cli_run_past_dense_len(tmp_path):
    env = {**os.environ, "LTRAIN_RUN_ID": "x", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ltrain.train", "attention=infllm_v2", "trainer.max_steps=20", "trainer.ckpt_every=0",
         f"trainer.out_dir={tmp_path}", f"data.seq_len={2 * PRESET.dense_len}", "data.micro_batch_size=2",
         "trainer.progress=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
