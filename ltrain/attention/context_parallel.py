"""The one context-parallel dispatch of the static-layout softmax kinds (dense, s2).

A kind supplies its whole-sequence core, `full_sequence(q, k, v, head_start)`
(what one device runs), and its block layout of the whole sequence,
`layout_fn(M)` for M blocks of `block_size`; this module decides how the
sharded sequence reaches them:

    no group          full_sequence on the local (= whole) sequence
    cp_impl=ulysses   all-to-all to whole sequences of Hq/cp heads, full_sequence
    cp_impl=ring      ring attention over the layout's tiles (zigzag or contiguous)

The dense layers of hybrid models (those with linear layers) take LASP-2H
instead; InfLLM-V2 chooses its blocks per step from all keys, so it gathers
K/V itself (parallel/infllm_v2_cp.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from ltrain.attention.context import AttnContext
from ltrain.kernels.layout import BlockLayout
from ltrain.parallel.ring import ring_attention
from ltrain.parallel.ulysses import ulysses_attention


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, *,
                      full_sequence: Callable[..., torch.Tensor], layout_fn: Callable[[int], BlockLayout],
                      block_size: int) -> torch.Tensor:
    """q: [B, Hq, n, D], k, v: [B, Hkv, n, D] (this rank's shard under ctx.cp_group) -> [B, Hq, n, D]."""
    if ctx.cp_group is None:
        return full_sequence(q, k, v)
    if ctx.cp_impl == "ulysses":
        return ulysses_attention(q, k, v, attn_fn=full_sequence, group=ctx.cp_group, mode=ctx.cp_mode)
    return ring_attention(q, k, v, layout_fn=layout_fn, group=ctx.cp_group, block_size=block_size,
                          mode=ctx.cp_mode)
