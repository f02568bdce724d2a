"""LASP-2H: the softmax-attention layers of a hybrid model under LASP-2.

The sequence is split over the P ranks of `group`, contiguously (rank r holds
chunk r of P) or zigzag (2P chunks, rank r holds chunks r and 2P-1-r, in that
order; parallel.sharding.shard_sequence), the split the model's other layers
use. Forward: one all-gather of K and V (packed into one buffer), put in
sequence order (a permutation of whole chunks; the identity for contiguous),
then causal softmax attention of each of this rank's query chunks against the
gathered keys by global position (key position p_k is visible to query
position p_q iff p_k <= p_q), through kernels' block_sparse_attention with the
chunk's global offset and a causal layout that lists only the key blocks up to
the chunk's queries: no mask tensor and no score matrix (the [B, Hq, c, P c]
scores a masked SDPA would build on CUDA), and keys past a chunk are never read.
Backward: block_sparse_attention's (from the saved lse, no recompute of the
forward), then one reduce-scatter returns to each rank the sum over ranks of
dK and dV of its own keys, reduced in fp32 (GatherKV).

lasp2h_sparse_attention is the same gather with a layout chosen per step from
all keys (InfLLM-V2's selection).

Packed documents (doc_ids, this rank's shard [B, n]): one more small
all-gather of the ids gives the whole row; each query chunk attends with
q_doc = its own ids and k_doc = the row's (block_sparse_attention skips key
blocks of other documents and masks boundary blocks), and a per-step select
gets the same q_doc / k_doc.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ltrain.kernels import block_sparse_attention
from ltrain.kernels.block_sparse import BLOCK_SIZES
from ltrain.kernels.layout import BlockLayout

from . import comm
from .lasp2 import check_mode
from .sharding import (as_split, check_sharded_qkv, check_split, chunk_ids, dense_block_size, gather_doc_ids,
                       slot_indices)

# Each query chunk must hold whole blocks of block_sparse_attention's smallest size.
MIN_BLOCK = min(BLOCK_SIZES)


@functools.lru_cache(maxsize=64)
def causal_layout(q_start: int, num_q_blocks: int, num_k_blocks: int, block_size: int, device) -> BlockLayout:
    """Query blocks of a chunk at global position q_start against keys from position 0: row i
    lists key blocks j with j * block_size <= q_start + (i + 1) * block_size - 1, its last
    query (the kernel masks the diagonal by position). Cached: the same few per run, and
    building one per step would cost device work and, for `transposed`, a host sync."""
    last_query = q_start + (torch.arange(num_q_blocks, device=device) + 1) * block_size - 1
    mask = torch.arange(num_k_blocks, device=device) * block_size <= last_query[:, None]
    width = min(num_k_blocks, (q_start + num_q_blocks * block_size - 1) // block_size + 1)
    return BlockLayout.from_block_mask(mask[None, None], max_active=width)


def _gathered_attention(q, k, v, group, mode, q_starts, layout_of, block_size, sm_scale=None, impl="auto",
                        doc_ids=None):
    """All-gather K/V once (GatherKV), then each of this rank's query chunks (len(q_starts)
    equal pieces of q, at global q_starts) attends the gathered keys through
    block_sparse_attention with layout_of(q_c, k_all detached, q_start), and with
    doc_ids (this rank's [B, n]) layout_of(..., q_doc=, k_doc=) and the same document mask."""
    k_all, v_all = GatherKV.apply(k, v, group, mode)
    row = gather_doc_ids(doc_ids, q, group, mode=mode, who="lasp2h_attention")
    c = q.shape[2] // len(q_starts)
    outs = []
    for a, q0 in enumerate(q_starts):
        q_c = q[:, :, a * c:(a + 1) * c]
        docs = {} if row is None else dict(q_doc=row[:, q0:q0 + c], k_doc=row)
        outs.append(block_sparse_attention(q_c, k_all, v_all, layout_of(q_c, k_all.detach(), q0, **docs),
                                           block_size=block_size, sm_scale=sm_scale, q_start=q0, k_start=0,
                                           impl=impl, **docs))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _slots(P, mode):
    """Global chunk held at each rank-major slot of a gather (rank s's chunks in its local order)."""
    return as_split(mode, P).slots()


def all_gather_kv(k, v, group, mode="contiguous"):
    """One all-gather of this rank's k, v [B, H, n, D] (packed into one buffer)
    -> k_all, v_all [B, H, P*n, D] in sequence order (global position p at index
    p) for the split `mode`; for contiguous this is rank-major, rank s's keys at
    [s n, (s+1) n)."""
    P = dist.get_world_size(group)
    packed = torch.cat([k.reshape(-1), v.reshape(-1)])
    gathered = packed.new_empty(P * packed.numel())
    comm.all_gather_into_tensor(gathered, packed, group=group)
    gathered = gathered.view(P, -1)
    return (_unshard(gathered[:, : k.numel()], k.shape, mode),
            _unshard(gathered[:, k.numel():], v.shape, mode))


def reduce_scatter_kv(dk_all, dv_all, k_shape, v_shape, group, mode="contiguous"):
    """Adjoint of all_gather_kv: gradients over the first Nk <= P*n keys in
    sequence order [B, H, Nk, D] -> this rank's dk, dv (k_shape, v_shape), summed
    over ranks in fp32 by one reduce-scatter."""
    P = dist.get_world_size(group)
    # fp32 (_shard upcasts) whatever k's dtype: the reduce-scatter sums P ranks' partial dK/dV of
    # every key, and a half-precision sum would round at each of the P - 1 additions (the error
    # growing with cp); each rank's partial is rounded once (the kernel returns k.dtype), the sum once.
    packed = torch.cat([_shard(dk_all, k_shape, P, mode), _shard(dv_all, v_shape, P, mode)], dim=1)
    mine = packed.new_empty(packed.shape[1])
    comm.reduce_scatter_tensor(mine, packed.reshape(-1), group=group)
    dk = mine[: math.prod(k_shape)].view(k_shape).to(dk_all.dtype)
    dv = mine[math.prod(k_shape):].view(v_shape).to(dv_all.dtype)
    return dk, dv


class GatherKV(torch.autograd.Function):
    """(k, v, group[, mode]) -> all_gather_kv(k, v, group, mode), differentiable:
    the backward is reduce_scatter_kv. For callers that attend with their own kernel."""

    @staticmethod
    def forward(ctx, k, v, group, mode="contiguous"):
        ctx.group, ctx.shapes, ctx.mode = group, (k.shape, v.shape), mode
        return all_gather_kv(k, v, group, mode)

    @staticmethod
    def backward(ctx, dk_all, dv_all):
        dk, dv = reduce_scatter_kv(dk_all, dv_all, *ctx.shapes, ctx.group, ctx.mode)
        return dk, dv, None, None


def _unshard(flat, shape, mode):
    """[P, B*H*n*D] rank-major shards -> [B, H, P*n, D] in sequence order (one copy)."""
    P = flat.shape[0]
    B, H, n, D = shape
    slots = _slots(P, mode)
    m = len(slots) // P
    x = flat.view(P, B, H, m, n // m, D).permute(1, 2, 0, 3, 4, 5)  # [B, H, P, m, c, D]
    if mode == "contiguous":
        return x.reshape(B, H, P * n, D)
    src = slot_indices(mode, P, flat.device)[1]
    return x[:, :, src // m, src % m].reshape(B, H, P * n, D)


def _shard(x, shape, P, mode):
    """[B, H, Nk, D] gradient over the first Nk <= P*n keys in sequence order
    -> [P, B*H*n*D] fp32 rank-major shards, zero-padded."""
    B, H, n, D = shape
    x = F.pad(x.float(), (0, 0, 0, P * n - x.shape[2]))
    if mode != "contiguous":
        slots = slot_indices(mode, P, x.device)[0]
        x = x.view(B, H, len(slots), -1, D)[:, :, slots]
    return x.reshape(B, H, P, n, D).permute(2, 0, 1, 3, 4).reshape(P, -1)


def lasp2h_attention(q, k, v, *, group=None, q_start=None, sm_scale=None, check_shards=False,
                     mode="contiguous", impl="auto", doc_ids=None):
    """Causal softmax attention over a sequence split across `group`.

    q: [B, Hq, n, D]; k, v: [B, Hkv, n, D] -- this rank's shard, Hq a multiple
    of Hkv (GQA). mode="contiguous": rank s's tokens sit at global positions
    [s n, (s+1) n); q_start: global position of this rank's first query
    (default rank * n). mode="zigzag": the sequence is 2P chunks of c = n/2 and
    rank s holds chunk s then chunk 2P-1-s (each local query chunk at its own
    global start); a parallel.sharding.Split likewise with its m chunks of n/m;
    q_start must then be None. A query chunk (n, or n/m) must be a multiple of
    16 tokens (whole attention blocks).
    sm_scale: softmax scale (default 1/sqrt(D)). check_shards: verify with one
    extra small all-gather that every rank's q, k, v have the same shape.
    impl: block_sparse_attention's ("auto": Triton on CUDA, PyTorch on CPU).
    doc_ids: [B, n] this rank's shard of packed rows' document ids (split like q),
    or None (one document per row).
    Returns o: [B, Hq, n, D], o_i = softmax(q_i K^T sm_scale, keys at
    global positions <= that of query i, and of i's document) V.
    """
    group = group if group is not None else dist.group.WORLD
    check_sharded_qkv(q, k, v, mode)
    C = q.shape[2]
    check_mode(mode, C)
    if mode != "contiguous" and q_start is not None:
        raise ValueError(f"q_start applies to mode='contiguous' only (a split's positions follow from the rank), "
                         f"got q_start={q_start}")
    if check_shards:
        comm.check_same_shape(group, q=q, k=k, v=v)
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    if mode != "contiguous":
        ids = chunk_ids(rank, P, mode)
        q_starts = tuple(ci * (C // len(ids)) for ci in ids)
    else:
        if q_start is None:
            q_start = rank * C
        if not 0 <= q_start <= (P - 1) * C:
            raise ValueError(f"q_start must lie in [0, (P-1) C] = [0, {(P - 1) * C}], got {q_start}")
        q_starts = (q_start,)
    check_split(C * P, P, mode, MIN_BLOCK, who="lasp2h_attention")
    bs = dense_block_size(C // len(q_starts))

    def layout_of(q_c, k_all, q0, **docs):  # the causal layout serves every document split
        return causal_layout(q0, q_c.shape[2] // bs, k_all.shape[2] // bs, bs, q_c.device)

    return _gathered_attention(q, k, v, group, mode, q_starts, layout_of, bs, sm_scale, impl, doc_ids)


def lasp2h_sparse_attention(q, k, v, *, select, group=None, mode="zigzag", block_size: int, impl: str = "auto",
                            doc_ids=None):
    """LASP-2H's one K/V all-gather with a sparse layout chosen per step from all keys
    (InfLLM-V2: a query's top-k blocks may lie anywhere before it, so no rank can pick
    without every key).

    q: [B, Hq, n, D]; k, v: [B, Hkv, n, D] -- this rank's shard (mode as in
    lasp2h_attention). For each local query chunk at global start q_start,
    select(q_c [B, Hq, c, D], k_all [B, Hkv, N, D] (detached, sequence order), q_start)
    returns its BlockLayout (block or token layout, keys from position 0), and
        o_c = block_sparse_attention(q_c, k_all, v_all, layout, q_start, k_start=0).
    doc_ids: [B, n] this rank's shard of packed rows' document ids: select is then
    called with q_doc= (the chunk's ids) and k_doc= (the row's), and the attention
    masks documents likewise.
    Returns o: [B, Hq, n, D]. Backward: block_sparse_attention's, then one
    reduce-scatter of dK/dV (GatherKV). N must divide into chunks of whole blocks.
    """
    group = group if group is not None else dist.group.WORLD
    check_sharded_qkv(q, k, v, mode)
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    check_split(q.shape[2] * P, P, mode, block_size, who="lasp2h_sparse_attention")
    ids = chunk_ids(rank, P, mode)
    c = q.shape[2] // len(ids)
    return _gathered_attention(q, k, v, group, mode, tuple(ci * c for ci in ids), select, block_size, impl=impl,
                               doc_ids=doc_ids)
