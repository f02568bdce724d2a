"""`dense`: causal softmax attention over the whole sequence.

One device: torch SDPA; over packed documents, block_sparse_attention's causal
layout with the document mask (blocks of two documents are skipped, boundary
blocks masked token by token). Context parallel: the dispatcher's ring
attention or Ulysses (`parallel.cp_impl`), LASP-2H in hybrid models
(ltrain/attention/context_parallel.py). No settings of its own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ltrain.attention.context import AttnContext
from ltrain.attention.gqa import GQAttention
from ltrain.attention.registry import check_ulysses_heads, is_hybrid, register


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_start: int = 0,
                     doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal) v; q: [B, Hq, N, D], k, v: [B, Hkv, N, D].
    doc_ids [B, N]: also within each token's document (N a multiple of 16, the kernel's
    smallest block). head_start (Ulysses' attn_fn signature) is not needed: every head
    has the same causal pattern."""
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    from ltrain.attention.context_parallel import causal_layout
    from ltrain.kernels.block_sparse import BLOCK_SIZES, block_sparse_attention
    from ltrain.parallel.sharding import dense_block_size

    n = q.shape[2]
    bs = dense_block_size(n)
    if bs < min(BLOCK_SIZES):
        raise ValueError(f"packed documents need the sequence length ({n}) to be a multiple of {min(BLOCK_SIZES)} "
                         "(data.seq_len)")
    return block_sparse_attention(q, k, v, causal_layout(n // bs, q.device), block_size=bs, q_doc=doc_ids,
                                  k_doc=doc_ids)


def validate(cfg, kinds: set[str]) -> None:
    if not is_hybrid(kinds):  # hybrid models' dense layers take LASP-2H, which splits no heads
        check_ulysses_heads(cfg)


@register("dense", "D", validate=validate)
def build(layer_idx: int, model_cfg, attn_cfg) -> GQAttention:
    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        # Kernels and collectives load when a layer runs, not when the config reads this module.
        from ltrain.attention.context_parallel import softmax_attention

        # Reported like the sparse kinds, so a mixed model's summary compares like with like.
        ctx.stats[f"attn/layer{layer_idx}/mode"] = "dense"
        ctx.stats[f"attn/layer{layer_idx}/block_fraction"] = 1.0
        return softmax_attention(q, k, v, ctx, full_sequence=causal_attention)

    return GQAttention(model_cfg, core)
