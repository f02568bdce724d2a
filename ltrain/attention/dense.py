"""`dense`: causal softmax attention over the whole sequence.

One device: torch SDPA. Context parallel, on the model's zigzag split: LASP-2H
(all-gather K/V) in hybrid models (those with linear layers), else ring
attention or Ulysses (`parallel.cp_impl`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltrain.attention.context import AttnContext
from ltrain.attention.context_parallel import softmax_attention
from ltrain.attention.gqa import GQAttention
from ltrain.attention.registry import register
from ltrain.kernels.layout import BlockLayout
from ltrain.parallel.lasp2h import lasp2h_attention


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_start: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal) v; q: [B, Hq, N, D], k, v: [B, Hkv, N, D].
    head_start (Ulysses' attn_fn signature) is not needed: every head has the same causal pattern."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def ring_block_size(chunk_len: int) -> int:
    """The largest power-of-two block (<= 64) that tiles one zigzag chunk."""
    bs = 64
    while chunk_len % bs:
        bs //= 2
    return bs


def dense_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    if ctx.cp_group is not None and ctx.hybrid:
        return lasp2h_attention(q, k, v, group=ctx.cp_group, mode=ctx.cp_mode)
    return softmax_attention(q, k, v, ctx, full_sequence=sdpa_causal, layout_fn=lambda m: BlockLayout.causal(m, m),
                             block_size=ring_block_size(q.shape[2] // 2))


@register("dense", "D")
def build(layer_idx: int, model_cfg, attn_cfg) -> GQAttention:
    def core(q, k, v, ctx: AttnContext) -> torch.Tensor:
        # Reported like the sparse kinds, so a mixed model's summary compares like with like.
        ctx.stats[f"attn/layer{layer_idx}/mode"] = "dense"
        ctx.stats[f"attn/layer{layer_idx}/block_fraction"] = 1.0
        return dense_core(q, k, v, ctx)

    return GQAttention(model_cfg, core)
