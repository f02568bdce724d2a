"""Ulysses (DeepSpeed-Ulysses) sequence parallelism: trade the sequence split
for a head split around an unchanged attention.

One all-to-all turns each rank's sequence shard of all heads [B, H, N/P, D]
into the whole sequence of H/P heads [B, H/P, N, D], in natural token order
(the split's shard order -- zigzag, contiguous or a balanced Split -- is
undone), so `attn_fn` can be any single-device attention: dense causal, S2,
InfLLM-V2. A second all-to-all
returns the output to the sequence split. Each all-to-all's backward is the
reverse all-to-all. About 4 N H D / P elements cross each rank's links per
layer in the forward (q, k, v and o); the degree P is capped by the heads.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from . import comm
from .sharding import as_split, check_sharded_qkv, gather_doc_ids, slot_indices


def _seq_to_heads(x: torch.Tensor, group, mode) -> torch.Tensor:
    """[B, H, n, D] sequence shard (split `mode`) -> [B, H/P, N, D], natural order."""
    P = dist.get_world_size(group)
    split = as_split(mode, P)
    B, H, n, D = x.shape
    send = x.reshape(B, P, H // P, n, D).transpose(0, 1).contiguous()  # [P dest, B, H/P, n, D]
    recv = torch.empty_like(send)  # [P source shard, B, H/P, n, D]
    comm.all_to_all_single(recv, send, group=group)
    chunks = recv.permute(1, 2, 0, 3, 4).reshape(B, H // P, split.num_chunks, n // split.m, D)  # rank-major slots
    if mode != "contiguous":
        chunks = chunks[:, :, slot_indices(mode, P, x.device)[1]]  # slot of each chunk: natural order
    return chunks.reshape(B, H // P, P * n, D)


def _heads_to_seq(x: torch.Tensor, group, mode) -> torch.Tensor:
    """Inverse of _seq_to_heads: [B, H/P, N, D] natural order -> [B, H, n, D] this rank's shard."""
    P = dist.get_world_size(group)
    split = as_split(mode, P)
    B, h, N, D = x.shape
    n = N // P
    chunks = x.unflatten(2, (split.num_chunks, n // split.m))
    if mode != "contiguous":
        chunks = chunks[:, :, slot_indices(mode, P, x.device)[0]]  # chunk of each slot: shard order
    send = chunks.reshape(B, h, P, n, D).permute(2, 0, 1, 3, 4).contiguous()  # [P dest shard, B, h, n, D]
    recv = torch.empty_like(send)  # [P source head group, B, h, n, D]
    comm.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(B, P * h, n, D)


_INVERSE = {_seq_to_heads: _heads_to_seq, _heads_to_seq: _seq_to_heads}


class _AllToAll(torch.autograd.Function):
    """One of the two re-layouts; its gradient is the other one (each is a permutation
    of the elements across ranks, so its adjoint is its inverse)."""

    @staticmethod
    def forward(ctx, x, fn, group, mode):
        ctx.fn, ctx.group, ctx.mode = fn, group, mode
        return fn(x, group, mode)

    @staticmethod
    def backward(ctx, dy):
        return _INVERSE[ctx.fn](dy, ctx.group, ctx.mode), None, None, None


def ulysses_attention(q, k, v, *, attn_fn: Callable[..., torch.Tensor], group, mode="zigzag",
                      doc_ids: torch.Tensor | None = None):
    """Attention over a sequence sharded across `group`, by head-parallel all-to-all.

    q: [B, Hq, n, D], k, v: [B, Hkv, n, D] -- this rank's shard of N = n * P
    tokens, split by `shard_sequence(..., mode=mode)`. Hq must be divisible by
    P; Hkv too, or else P divisible by Hkv (each KV head is then replicated
    P / Hkv times, and its gradient summed back).

    Calls attn_fn(q_h, k_h, v_h, head_start=h0) with q_h [B, Hq/P, N, D],
    k_h, v_h [B, max(Hkv, P)/P, N, D]: the whole sequence in natural order
    for query heads [h0, h0 + Hq/P), h0 = rank * Hq / P, so a per-head layout
    (S2) takes its heads' rows: counts[:, h0:h0 + Hq/P]. attn_fn returns
    [B, Hq/P, N, D]; the result is o [B, Hq, n, D] in q's shard order.
    doc_ids: [B, n] this rank's shard of packed rows' document ids (split like q):
    one small all-gather gives the whole row [B, N], natural order, and attn_fn is
    called with doc_ids= it (only then, so an attn_fn for unpacked rows need not take it).
    group: the context-parallel group (None: the default group).
    """
    group = group if group is not None else dist.group.WORLD
    check_sharded_qkv(q, k, v, mode)
    P = dist.get_world_size(group)
    Hq, Hkv, n = q.shape[1], k.shape[1], q.shape[2]
    if Hq % P:
        raise ValueError(f"ulysses_attention: {Hq} query heads are not divisible by the cp degree P = {P}")
    if Hq % Hkv:
        raise ValueError(f"ulysses_attention: {Hq} query heads are not a multiple of {Hkv} KV heads")
    if Hkv % P:
        if P % Hkv:
            raise ValueError(f"ulysses_attention: {Hkv} KV heads neither divide by nor divide the cp degree P = {P}")
        k, v = (x.repeat_interleave(P // Hkv, dim=1) for x in (k, v))
    m = as_split(mode, P).m
    if n % m:
        raise ValueError(f"ulysses_attention: a {mode if isinstance(mode, str) else 'split'} shard holds {m} equal "
                         f"chunks, got n = {n} tokens")
    row = gather_doc_ids(doc_ids, q, group, mode=mode, who="ulysses_attention")
    docs = {} if row is None else {"doc_ids": row}
    q_h, k_h, v_h = (_AllToAll.apply(x, _seq_to_heads, group, mode) for x in (q, k, v))
    o_h = attn_fn(q_h, k_h, v_h, head_start=dist.get_rank(group) * (Hq // P), **docs)
    return _AllToAll.apply(o_h, _heads_to_seq, group, mode)
