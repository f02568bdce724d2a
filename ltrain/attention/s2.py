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

Packed documents: I, J, the local band and the stripes count blocks of the
whole row (global block indices), and the document mask applies on top
(block_sparse_attention's q_doc / k_doc: key blocks of other documents are
skipped, boundary blocks masked token by token). So the layout stays static,
built and cached once per sequence length with its ring plans and head slices,
and a step does no host work for its documents; a document's stripes are
therefore at the row's stripe positions, not at offsets from its own start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ltrain.attention.context import AttnContext
from ltrain.attention.gqa import GQAttention
from ltrain.attention.registry import check_ulysses_heads, register
from ltrain.errors import config_error

if TYPE_CHECKING:
    from ltrain.kernels.layout import BlockLayout

log = logging.getLogger("ltrain.config")  # a config-time finding, logged with the config's others


@dataclass
class S2Config:
    """attention.s2; defaults are the paper's / Phi-3-small's (docs/algorithms.md#s2-parameters-and-defaults)."""

    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    homo_head: bool = False
    head_sliding_offset: int = 1  # 1: vLLM / Phi-3-small; 0: DKernel's default
    num_dense_heads: int = 0


def validate(cfg, kinds: set[str]) -> None:
    """cfg: the whole TrainConfig. ConfigError naming the key; a layout that drops
    context is a warning (_warn_coverage)."""
    from ltrain.kernels.block_sparse import BLOCK_SIZES  # the kernel is the authority on its tiles

    s2 = cfg.attention.s2
    if s2.block_size not in BLOCK_SIZES:
        raise config_error("attention.s2.block_size", s2.block_size,
                           f"allowed values are {', '.join(map(str, BLOCK_SIZES))}")
    for key in ("local_blocks", "vert_stride"):
        if getattr(s2, key) < 1:
            raise config_error(f"attention.s2.{key}", getattr(s2, key), "must be a positive integer")
    if s2.head_sliding_offset < 0:
        raise config_error("attention.s2.head_sliding_offset", s2.head_sliding_offset, "must be >= 0")
    if not 0 <= s2.num_dense_heads <= cfg.model.n_heads:
        raise config_error("attention.s2.num_dense_heads", s2.num_dense_heads,
                           f"must be in [0, model.n_heads={cfg.model.n_heads}]")
    if cfg.data.seq_len % s2.block_size:
        raise config_error("data.seq_len", cfg.data.seq_len,
                           f"must be a multiple of attention.s2.block_size={s2.block_size}")
    check_ulysses_heads(cfg)
    _warn_coverage(cfg)


def _warn_coverage(cfg) -> None:
    """Log one warning line when the S2 layout drops context: some causal block
    pair beyond the local band that no head attends (kernels.s2: covered iff
    the distinct head patterns, n_heads or 1 with homo_head, reach vert_stride,
    or a head is dense). A warning, not an error: `attention=s2-paper` on the
    default tiny model (4 heads, stride 8) is such a combination, and at the
    default data.seq_len everything is still within the local band."""
    from ltrain.kernels.s2 import s2_pattern_coverage

    s2, n_heads, bs = cfg.attention.s2, cfg.model.n_heads, cfg.attention.s2.block_size
    params = dict(vert_stride=s2.vert_stride, homo_head=s2.homo_head, head_sliding_offset=s2.head_sliding_offset,
                  num_dense_heads=s2.num_dense_heads)
    # Whether some length drops context does not depend on the local band (the
    # vertical rule ignores the query block), so test the mask of a one-block
    # band over 1 + vert_stride blocks: small whatever local_blocks is.
    probe = s2_pattern_coverage(n_heads, 1 + s2.vert_stride, local_blocks=1, **params)
    if probe.covered:
        return
    first = (s2.local_blocks + probe.example[1] + 1) * bs  # shortest sequence with an uncovered pair
    data_blocks = cfg.data.seq_len // bs
    fraction = 0.0  # a data.seq_len within the local band drops nothing yet
    if data_blocks > s2.local_blocks:
        fraction = s2_pattern_coverage(n_heads, data_blocks, local_blocks=s2.local_blocks, **params).fraction
    patterns = 1 if s2.homo_head else n_heads
    homo = "attention.s2.homo_head=true (one shared pattern), " if s2.homo_head else ""
    if not s2.homo_head:
        fix_heads = f"model.n_heads >= {s2.vert_stride}"
    elif n_heads >= s2.vert_stride:
        fix_heads = "attention.s2.homo_head=false"
    else:
        fix_heads = f"model.n_heads >= {s2.vert_stride} with attention.s2.homo_head=false"
    log.warning(
        f"attention.s2.vert_stride={s2.vert_stride} with model.n_heads={n_heads}, {homo}"
        f"attention.s2.num_dense_heads=0 drops context: {patterns} distinct head pattern(s) < vert_stride, so "
        f"beyond the local band (attention.s2.local_blocks={s2.local_blocks}) no head attends some key blocks "
        f"in sequences of {first} tokens or more ({fraction:.1%} of causal block pairs at data.seq_len="
        f"{cfg.data.seq_len}); fix: {fix_heads}, attention.s2.vert_stride <= {patterns}, "
        "or attention.s2.num_dense_heads >= 1"
    )


class S2Core:
    """core(q [B, Hq, N, D], k, v [B, Hkv, N, D], ctx) -> [B, Hq, N, D].

    The layout depends only on (N, device), so it is built once per pair and
    kept (with what follows from it: Ulysses' head slices, the ring's tile
    plans): a training run sees one or two sequence lengths, and a step syncs
    with the host for none of it. Each call records the layer's attended
    fraction of causal block pairs (whole sequence) in ctx.stats, a number
    computed once per layout."""

    def __init__(self, layer_idx: int, n_heads: int, s2_cfg):
        self.layer_idx = layer_idx
        self.n_heads = n_heads
        self.cfg = s2_cfg
        self._layouts: dict[tuple[int, torch.device], BlockLayout] = {}
        self._fractions: dict[int, float] = {}

    def layout(self, seq_len: int, device: torch.device) -> BlockLayout:
        from ltrain.kernels.s2 import s2_layout

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

    def full_sequence(self, q, k, v, head_start: int = 0, doc_ids=None) -> torch.Tensor:
        """S2 over a whole sequence for query heads [head_start, head_start + Hq);
        doc_ids [B, N]: within each token's document too (the module doc)."""
        from ltrain.kernels.block_sparse import block_sparse_attention

        layout = whole = self.layout(q.shape[2], q.device)
        if whole.counts.shape[1] > 1:  # per-head layout: this call's heads only (Ulysses), kept like the layout
            layout = whole.cached(("heads", head_start, q.shape[1]), lambda: whole.heads(head_start, q.shape[1]))
        return block_sparse_attention(q, k, v, layout, block_size=self.cfg.block_size, causal=True,
                                      q_doc=doc_ids, k_doc=doc_ids)

    def record_stats(self, seq_len: int, device: torch.device, ctx: AttnContext) -> None:
        if seq_len not in self._fractions:
            self._fractions[seq_len] = self.layout(seq_len, device).causal_density()
        ctx.stats[f"attn/layer{self.layer_idx}/mode"] = "sparse"
        ctx.stats[f"attn/layer{self.layer_idx}/block_fraction"] = self._fractions[seq_len]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        from ltrain.attention.context_parallel import softmax_attention

        cp = 1 if ctx.cp_group is None else dist.get_world_size(ctx.cp_group)
        self.record_stats(q.shape[2] * cp, q.device, ctx)
        bs = self.cfg.block_size
        return softmax_attention(q, k, v, ctx, full_sequence=self.full_sequence,
                                 layout_fn=lambda m: self.layout(m * bs, q.device), block_size=bs)


@register("s2", "S", config=S2Config, validate=validate, block_size=lambda cfg: cfg.attention.s2.block_size)
def build(layer_idx: int, model_cfg, attn_cfg) -> GQAttention:
    return GQAttention(model_cfg, S2Core(layer_idx, model_cfg.n_heads, attn_cfg.s2))
