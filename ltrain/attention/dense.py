"""`dense`: causal softmax attention over the whole (local) sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltrain.attention.context import AttnContext
from ltrain.attention.gqa import GQAttention
from ltrain.attention.registry import register


def dense_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal) v; q: [B, Hq, N, D], k, v: [B, Hkv, N, D]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@register("dense", "D")
def build(layer_idx: int, model_cfg, attn_cfg) -> GQAttention:
    return GQAttention(model_cfg, dense_core)
