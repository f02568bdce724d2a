"""The one context-parallel dispatch of the softmax kinds (dense, s2, infllm_v2).

A kind supplies its whole-sequence core, `full_sequence(q, k, v, head_start,
doc_ids=...)` (what one device runs), and its layout, one of:

    neither            dense causal attention
    layout_fn(M)       a static BlockLayout of the whole sequence, M blocks of block_size (S2)
    select(q_c, k_all, q_start, q_doc=..., k_doc=...)
                       a layout chosen per step from all keys for the query chunk q_c at
                       global position q_start (InfLLM-V2's top-k: a query's blocks may lie
                       anywhere before it)

Packed documents (ctx.doc_ids, this rank's shard [B, n]): full_sequence gets the
whole row's ids as `doc_ids=` and select the chunk's and all keys' as `q_doc=`,
`k_doc=`, both only when there are documents (a core for unpacked rows need not
take them); ring, Ulysses and LASP-2H take the shard and gather what they need.

and this module decides how the sharded sequence reaches them:

    no group                        full_sequence on the local (= whole) sequence
    dense, hybrid model             LASP-2H: all-gather K/V (the split its linear layers use)
    cp_impl=ulysses                 all-to-all to whole sequences of Hq/cp heads, full_sequence;
                                    a per-step layout needs whole KV groups per rank
                                    (Hkv % cp == 0: selection sums a group's query heads),
                                    else it takes the path below (logged once)
    select                          all-gather K/V, each local query chunk selects over all keys
                                    (parallel.lasp2h.lasp2h_sparse_attention)
    otherwise                       ring attention over the layout's tiles (zigzag or contiguous)

Host work is paid once per sequence length, not per step: dense layers'
causal ring layout is built once per (blocks, device) here, the ring keeps
its tile plan with the layout (parallel.ring.cached_plan), and a kind with a
static layout keeps it likewise (S2). After that first call no path reads a
device value on the host (tests/ltrain/attention/test_no_host_sync.py).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ltrain.attention.context import AttnContext
from ltrain.kernels.layout import BlockLayout
from ltrain.parallel.lasp2h import lasp2h_attention, lasp2h_sparse_attention
from ltrain.parallel.ring import ring_attention
from ltrain.parallel.sharding import chunks_per_rank, dense_block_size
from ltrain.parallel.ulysses import ulysses_attention

log = logging.getLogger("ltrain.attention")
_logged: set[str] = set()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.info(reason)


@functools.lru_cache(maxsize=16)
def causal_layout(num_blocks: int, device: torch.device) -> BlockLayout:
    """BlockLayout.causal(M, M) on `device`, built once per (M, device): the dense ring layout,
    whose M x M mask and tile plan cost about a second of host work per call at 128K tokens."""
    return BlockLayout.causal(num_blocks, num_blocks, device=device)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, *,
                      full_sequence: Callable[..., torch.Tensor], block_size: Optional[int] = None,
                      layout_fn: Optional[Callable[[int], BlockLayout]] = None,
                      select: Optional[Callable[..., BlockLayout]] = None) -> torch.Tensor:
    """q: [B, Hq, n, D], k, v: [B, Hkv, n, D] (this rank's shard under ctx.cp_group) -> [B, Hq, n, D].

    block_size: the kind's attention block (the ring's tile, the gathered path's block);
    dense may leave it None."""
    group, docs = ctx.cp_group, ctx.doc_ids
    if group is None:
        return full_sequence(q, k, v) if docs is None else full_sequence(q, k, v, doc_ids=docs)
    dense = layout_fn is None and select is None
    if dense and ctx.hybrid:
        return lasp2h_attention(q, k, v, group=group, mode=ctx.cp_mode, doc_ids=docs)
    P = dist.get_world_size(group)
    if ctx.cp_impl == "ulysses":
        if select is None or k.shape[1] % P == 0:
            return ulysses_attention(q, k, v, attn_fn=full_sequence, group=group, mode=ctx.cp_mode, doc_ids=docs)
        _log_once(f"Ulysses needs whole KV groups per rank for a per-step selection ({k.shape[1]} KV heads, "
                  f"cp={P}); this layer all-gathers K/V instead")
    if select is not None:
        _log_once("a per-step sparse layout under context parallelism all-gathers K/V "
                  "(fetching only the selected blocks is not implemented yet)")
        return lasp2h_sparse_attention(q, k, v, select=select, group=group, mode=ctx.cp_mode, block_size=block_size,
                                       doc_ids=docs)
    if dense:
        block_size = dense_block_size(q.shape[2] // chunks_per_rank(ctx.cp_mode))  # a block divides every chunk
        layout_fn = functools.partial(causal_layout, device=q.device)
    return ring_attention(q, k, v, layout_fn=layout_fn, group=group, block_size=block_size, mode=ctx.cp_mode,
                          doc_ids=docs)
