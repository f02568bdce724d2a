"""The `s2` attention kind: registry wiring, exactness against masked dense
attention, errors, and a short CLI training run."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ltrain.attention.context import AttnContext
from ltrain.attention.gqa import GQAttention
from ltrain.attention.registry import build_attention
from ltrain.attention.s2 import S2Core
from ltrain.config import AttentionConfig, ModelConfig
from ltrain.kernels.s2 import s2_layout
from ltrain.nn.rope import rope_tables
from ltrain.models.transformer import Transformer

REPO = Path(__file__).resolve().parents[3]


def tiny_s2_cfg(**s2):
    attn = AttentionConfig(pattern="SD")
    attn.s2.block_size, attn.s2.local_blocks, attn.s2.vert_stride = 16, 4, 4
    for key, value in s2.items():
        setattr(attn.s2, key, value)
    return ModelConfig(), attn


def context(b, n, head_dim, cp_group=None):
    positions = torch.arange(n).expand(b, n)
    cos, sin = rope_tables(positions, head_dim)
    return AttnContext(cos=cos, sin=sin, cp_group=cp_group)


def test_pattern_SD_alternates_s2_and_dense_layers():
    model_cfg, attn_cfg = tiny_s2_cfg()
    model = Transformer(model_cfg, attn_cfg)
    assert model.kinds == ["s2", "dense", "s2", "dense"]
    assert isinstance(model.layers[0].attn.core, S2Core)
    assert not isinstance(model.layers[1].attn.core, S2Core)


@pytest.mark.parametrize("s2", [{}, {"num_dense_heads": 1, "head_sliding_offset": 0}])
def test_s2_layer_equals_dense_attention_under_the_s2_mask(s2):
    """Same weights; dense SDPA with the S2 token mask (x causal) is the oracle,
    for the output and for every gradient."""
    torch.manual_seed(0)
    model_cfg, attn_cfg = tiny_s2_cfg(**s2)
    b, n, head_dim = 2, 128, model_cfg.dim // model_cfg.n_heads
    sparse = build_attention("s2", 0, model_cfg, attn_cfg)
    c = attn_cfg.s2
    layout = s2_layout(model_cfg.n_heads, n, block_size=c.block_size, local_blocks=c.local_blocks,
                       vert_stride=c.vert_stride, head_sliding_offset=c.head_sliding_offset,
                       num_dense_heads=c.num_dense_heads)
    mask = layout.to_mask(n, n) & torch.ones(n, n, dtype=torch.bool).tril()
    dense = GQAttention(model_cfg, lambda q, k, v, ctx: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True))
    dense.load_state_dict(sparse.state_dict())

    x = torch.randn(b, n, model_cfg.dim)
    ctx = context(b, n, head_dim)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = sparse(xs, ctx), dense(xd, ctx)
    torch.testing.assert_close(ys, yd)
    g = torch.randn_like(ys)
    ys.backward(g), yd.backward(g)
    torch.testing.assert_close(xs.grad, xd.grad)
    for (name, ps), pd in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(ps.grad, pd.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_sequence_not_divisible_by_block_size_names_both_keys():
    model_cfg, attn_cfg = tiny_s2_cfg()
    layer = build_attention("s2", 0, model_cfg, attn_cfg)
    with pytest.raises(ValueError, match=r"attention\.s2\.block_size=16.*data\.seq_len"):
        layer(torch.randn(1, 40, model_cfg.dim), context(1, 40, model_cfg.dim // model_cfg.n_heads))


def test_layer_warns_once_when_its_layout_drops_context():
    """4 heads, vert_stride 8 (step 2): the heads see only odd key blocks beyond the
    local band, so the first forward at a length past the band warns; the
    covered test config (stride 4) does not."""
    model_cfg, attn_cfg = tiny_s2_cfg(vert_stride=8, local_blocks=2)
    layer = build_attention("s2", 0, model_cfg, attn_cfg)
    head_dim = model_cfg.dim // model_cfg.n_heads
    x = torch.randn(1, 128, model_cfg.dim)
    with pytest.warns(UserWarning, match="that context is dropped") as record:
        layer(x, context(1, 128, head_dim))
        layer(x, context(1, 128, head_dim))  # the layout is cached: no second warning
    assert len([w for w in record if "that context is dropped" in str(w.message)]) == 1
    model_cfg, attn_cfg = tiny_s2_cfg()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_attention("s2", 0, model_cfg, attn_cfg)(x, context(1, 128, head_dim))


def test_cli_training_with_s2_preset_learns(tmp_path):
    env = {**os.environ, "LTRAIN_RUN_ID": "x", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ltrain.train", "attention=s2", "trainer.max_steps=30", "trainer.log_every=5",
         f"trainer.out_dir={tmp_path}", "trainer.ckpt_every=0", "trainer.progress=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layers SDSD" in proc.stdout + proc.stderr
    assert "drops context" not in proc.stderr and "context is dropped" not in proc.stderr  # the preset covers
    rows = [json.loads(line) for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.8 * losses[0], f"loss did not fall: {losses}"


def test_documents_count_stripes_and_band_over_the_whole_row():
    """Packed documents: the S2 layout stays the row's (global block indices: static,
    cached once per length), the document mask applies on top. Oracle: SDPA with
    layout mask x causal x same document; and that differs from counting the stripes
    from each document's start (so the test tells the two choices apart)."""
    torch.manual_seed(0)
    model_cfg, attn_cfg = tiny_s2_cfg(local_blocks=2)
    n, h, d = 256, model_cfg.n_heads, model_cfg.dim // model_cfg.n_heads
    c = attn_cfg.s2
    core = S2Core(0, h, c)
    lengths = [40, 5, 100, 111]
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths)).expand(2, n).to(torch.int32)
    q = torch.randn(2, h, n, d, requires_grad=True)
    k, v = (torch.randn(2, model_cfg.n_kv_heads, n, d, requires_grad=True) for _ in range(2))
    out = core(q, k, v, AttnContext(cos=torch.zeros(()), sin=torch.zeros(()), doc_ids=doc))
    layout = core.layout(n, torch.device("cpu")).to_mask(n, n)  # [H, n, n]
    same_doc = doc[0][:, None] == doc[0][None, :]
    mask = layout & torch.ones(n, n, dtype=torch.bool).tril() & same_doc
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(a, b)
    s, e = 145, 256  # the last document: 111 tokens from mid-block 9
    own = core.layout(112, torch.device("cpu")).to_mask(112, 112)[:, :e - s, :e - s]
    assert not torch.equal(layout[:, s:e, s:e] & mask[:, s:e, s:e], own & mask[:, s:e, s:e])
