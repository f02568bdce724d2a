"""Model FLOPs per token (ltrain/flops.py) against a hand count and against torch's own FLOP
counter on the real model; the peak table and the MFU arithmetic."""

from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ltrain.config import TrainConfig
from ltrain.flops import bf16_peak_tflops, flops_per_token, matmul_params, peak_tflops, throughput


def _tiny(pattern: str) -> TrainConfig:
    cfg = TrainConfig()
    m = cfg.model
    m.vocab_size, m.dim, m.n_layers, m.n_heads, m.n_kv_heads = 64, 16, 3, 2, 1
    cfg.attention.pattern = pattern
    cfg.attention.linear.chunk_size = 32
    cfg.data.seq_len = 32
    return cfg


def test_flops_per_token_hand_count():
    """dim 16, 2 query heads and 1 KV head of D = 8, SwiGLU hidden 64 (8/3 * 16 = 42 rounded up
    to a multiple of 64), vocab 64, N = 32; layers dense, S2 attending half, lightning with C = 32."""
    per_layer = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 3 * 16 * 64  # W_q, W_k, W_v, W_o, w1 w3 w2
    params = 3 * per_layer + 64 * 16  # and the (tied) output head
    assert params == 12544
    dense = 3 * 2 * 2 * (2 * 8) * (32 * 33 // 2) // 32  # 3 passes x heads x (q.k, p.v) x 2D FLOPs x mean keys
    s2 = dense // 2
    linear = 3 * 2 * ((2 * 8) * 2 * (32 * 33 // 2) // 32 + 2 * (2 * 8 * 8))  # intra-chunk causal + state
    assert (dense, s2, linear) == (3168, 1584, 4704)
    stats = {"attn/layer1/block_fraction": 0.5, "attn/layer1/mode": "sparse"}
    assert flops_per_token(_tiny("DSL"), stats) == 6 * params + dense + s2 + linear == 84720


def test_a_layer_without_stats_counts_as_fully_causal():
    assert flops_per_token(_tiny("S"), {}) == flops_per_token(_tiny("D"), {})
    assert flops_per_token(_tiny("S"), {"attn/layer0/block_fraction": 0.25}) < flops_per_token(_tiny("D"), {})


@pytest.mark.parametrize("tie", [True, False])
def test_matmul_part_equals_torch_flop_counter_on_the_model(tie):
    """6 P per token is what torch counts for every matmul of forward + backward of the real model
    (dense attention, whose CPU SDPA the counter leaves out), the chunked loss included."""
    from ltrain.loss import chunked_lm_loss
    from ltrain.models.transformer import Transformer

    cfg = _tiny("D")
    cfg.model.tie_embeddings = tie
    model = Transformer(cfg.model, cfg.attention)
    ids = torch.randint(0, 64, (2, 32))
    with FlopCounterMode(display=False) as counter:
        loss = model(ids, output=partial(chunked_lm_loss, labels=ids, chunk=16))[0]
        loss.backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if str(op) in ("aten.mm", "aten.addmm"))
    assert matmuls == 6 * matmul_params(cfg.model) * ids.numel()


def test_peak_from_the_device_name_or_the_setting():
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA H100 NVL") == 835.0
    assert bf16_peak_tflops("NVIDIA H200") == 989.0
    assert bf16_peak_tflops("Tesla V100-SXM2-16GB") is None
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 123.0) == 123.0


def test_throughput_per_device_and_mfu_only_with_a_peak():
    assert throughput(1e6, 2e6, 2, None) == {"tflops_per_device": 1.0}
    assert throughput(1e6, 2e6, 2, 4.0) == {"tflops_per_device": 1.0, "mfu_pct": 25.0}
