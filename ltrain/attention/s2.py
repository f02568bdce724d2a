"""`s2`: S2-Attention (sparsely-sharded heads), causal block-sparse softmax
attention whose static layout mixes a local band with per-head vertical
stripes (kernels.s2; docs/algorithms.md#s2-attention):

    o_i = sum_{j visible to head h} softmax_j(q_i . k_j / sqrt(D)) v_j,
    key block J visible to query block I iff J <= I and
        (I - J < local_blocks  or  (J + h * step + offset) % vert_stride == 0)

The heads together see every causal block pair iff they have >= vert_stride
distinct patterns (model.n_heads, or 1 with homo_head) or one is dense
(num_dense_heads > 0); otherwise distant context is dropped: config
validation logs a warning naming the keys, and kernels.s2.s2_layout warns
(UserWarning) when a layout built for an actual sequence length misses a pair.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ltrain.attention.context import AttnContext
from ltrain.attention.context_parallel import softmax_attention
from ltrain.attention.gqa import GQAttention
from ltrain.attention.registry import register
from ltrain.kernels.block_sparse import block_sparse_attention
from ltrain.kernels.layout import BlockLayout
from ltrain.kernels.s2 import s2_layout


class S2Core:
    """core(q [B, Hq, N, D], k, v [B, Hkv, N, D], ctx) -> [B, Hq, N, D].

    The layout depends only on (N, device), so it is built once per pair and
    kept: a training run sees one or two sequence lengths. Each call records
    the layer's attended fraction of causal block pairs (whole sequence) in
    ctx.stats, computed once per layout."""

    def __init__(self, layer_idx: int, n_heads: int, s2_cfg):
        self.layer_idx = layer_idx
        self.n_heads = n_heads
        self.cfg = s2_cfg
        self._layouts: dict[tuple[int, torch.device], BlockLayout] = {}
        self._fractions: dict[int, float] = {}

    def layout(self, seq_len: int, device: torch.device) -> BlockLayout:
        key = (seq_len, device)
        if key not in self._layouts:
            c = self.cfg
            if seq_len % c.block_size:
                raise ValueError(
                    f"attention.s2.block_size={c.block_size} does not divide the sequence length {seq_len} "
                    "(data.seq_len, or its share per context-parallel rank): choose data.seq_len as a "
                    "multiple of attention.s2.block_size"
                )
            self._layouts[key] = s2_layout(
                self.n_heads, seq_len, block_size=c.block_size, local_blocks=c.local_blocks,
                vert_stride=c.vert_stride, homo_head=c.homo_head, head_sliding_offset=c.head_sliding_offset,
                num_dense_heads=c.num_dense_heads, device=device,
            )
        return self._layouts[key]

    def full_sequence(self, q, k, v, head_start: int = 0) -> torch.Tensor:
        """S2 over a whole sequence for query heads [head_start, head_start + Hq)."""
        layout = self.layout(q.shape[2], q.device)
        if layout.counts.shape[1] > 1:  # per-head layout: this call's heads only (Ulysses)
            layout = layout.heads(head_start, q.shape[1])
        return block_sparse_attention(q, k, v, layout, block_size=self.cfg.block_size, causal=True)

    def record_stats(self, seq_len: int, device: torch.device, ctx: AttnContext) -> None:
        if seq_len not in self._fractions:
            self._fractions[seq_len] = self.layout(seq_len, device).causal_density()
        ctx.stats[f"attn/layer{self.layer_idx}/mode"] = "sparse"
        ctx.stats[f"attn/layer{self.layer_idx}/block_fraction"] = self._fractions[seq_len]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        cp = 1 if ctx.cp_group is None else dist.get_world_size(ctx.cp_group)
        self.record_stats(q.shape[2] * cp, q.device, ctx)
        bs = self.cfg.block_size
        return softmax_attention(q, k, v, ctx, full_sequence=self.full_sequence,
                                 layout_fn=lambda m: self.layout(m * bs, q.device), block_size=bs)


@register("s2", "S")
def build(layer_idx: int, model_cfg, attn_cfg) -> GQAttention:
    return GQAttention(model_cfg, S2Core(layer_idx, model_cfg.n_heads, attn_cfg.s2))
