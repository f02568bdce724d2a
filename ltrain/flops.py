"""Model FLOPs per token, TFLOP/s and MFU, counted the way TorchTitan counts them.

    flops/token = 6 P + sum over layers of the layer's attention FLOPs       (forward + backward)

P: the weights each token is multiplied by, from the config: per layer W_q,
W_k, W_v, W_o and the SwiGLU's w1, w3, w2, plus the output projection
[V, dim], tied or not (the embedding lookup is no matmul). 6 = 2 FLOPs per
multiply-add x 3 matmuls (forward, and the backward's input and weight grads).

Softmax layers (dense, S2, InfLLM-V2), D = dim / n_heads: q.k and p.v cost
2 D FLOPs each per (query, key, query head) in the forward and twice that in
the backward (flash attention's recompute is not counted); a query attends
f (N + 1) / 2 keys on average, f the layer's attended fraction of the causal
pairs (`attn/layer{i}/block_fraction` in the kinds' stats, 1 for dense):

    6 Hq D f (N + 1)

TorchTitan's 12 Hq D N counts the whole square for causal attention by
convention; this counts the causal pairs, so that a sparse kind's fraction
scales the same quantity as dense's. Linear layers (lightning, chunk C): the
intra-chunk causal part attends (C + 1) / 2 keys (4 D FLOPs each), the
inter-chunk part reads and updates a D x D state per token (2 D^2 each):

    3 Hq (2 D (C + 1) + 4 D^2)

Model FLOPs, not hardware FLOPs: activation-checkpointing recompute and
InfLLM-V2's block scoring are not counted. MFU divides the FLOP/s of one
device by its dense bf16 peak (whatever trainer.precision is, as TorchTitan
does), looked up by torch.cuda.get_device_name, or trainer.peak_tflops when set.
"""

from __future__ import annotations

from typing import Optional

import torch

from ltrain.attention.registry import kinds as attention_kinds
from ltrain.attention.registry import resolve_layer_kinds
from ltrain.nn.layers import swiglu_hidden

# Dense bf16 tensor-core peak per device, TFLOP/s, by a substring of the device name (first match wins).
PEAK_BF16_TFLOPS = (
    ("A100", 312.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
)


def matmul_params(model_cfg) -> int:
    """P: weights multiplied per token (the layers' projections and MLPs, and the output head)."""
    dim, d = model_cfg.dim, model_cfg.dim // model_cfg.n_heads
    attn = dim * d * (2 * model_cfg.n_heads + 2 * model_cfg.n_kv_heads)  # W_q, W_o; W_k, W_v
    mlp = 3 * dim * swiglu_hidden(dim, model_cfg.ffn_dim, model_cfg.multiple_of)
    return model_cfg.n_layers * (attn + mlp) + model_cfg.vocab_size * dim


def attention_flops(kind: str, model_cfg, attn_cfg, seq_len: int, fraction: float = 1.0) -> float:
    """One layer's attention FLOPs per token, forward + backward (the module docstring's formulas)."""
    h, d = model_cfg.n_heads, model_cfg.dim // model_cfg.n_heads
    if attention_kinds()[kind].softmax:
        return 6 * h * d * fraction * (seq_len + 1)
    c = min(attn_cfg.linear.chunk_size, seq_len)  # lightning, the kind without a softmax
    return 3 * h * (2 * d * (c + 1) + 4 * d * d)


def flops_per_token(cfg, stats: dict) -> float:
    """Model FLOPs per trained token; cfg: TrainConfig, stats: the kinds' plain per-layer stats
    (a layer that reported no fraction counts as fully causal)."""
    m, a = cfg.model, cfg.attention
    layers = resolve_layer_kinds(a.pattern, a.layers, m.n_layers)
    attn = sum(attention_flops(kind, m, a, cfg.data.seq_len, float(stats.get(f"attn/layer{i}/block_fraction", 1.0)))
               for i, kind in enumerate(layers))
    return 6 * matmul_params(m) + attn


def peak_tflops(device: torch.device, configured: float = 0.0) -> Optional[float]:
    """Peak TFLOP/s of one device: `configured` when > 0, else the table's for the GPU's name,
    else None (CPU, or a GPU not in the table)."""
    if configured > 0:
        return configured
    return bf16_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def bf16_peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak TFLOP/s of a GPU by its name ("NVIDIA H100 80GB HBM3"), None if not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def throughput(flops_per_tok: float, tokens_per_s: float, devices: int, peak: Optional[float]) -> dict:
    """tokens_per_s over `devices` devices -> {"tflops_per_device": model TFLOP/s of one device,
    "mfu_pct": its percentage of `peak` (left out when peak is None)}."""
    tflops = flops_per_tok * tokens_per_s / devices / 1e12
    return {"tflops_per_device": tflops, **({"mfu_pct": 100 * tflops / peak} if peak else {})}
