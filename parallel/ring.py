"""Ring attention: causal block-sparse softmax attention over a sequence sharded
across the P ranks of a context-parallel group.

Each rank keeps its queries and passes its K/V block around the ring: at step
s it holds the K/V of rank (r - s) mod P and attends its query chunks to the
visiting key chunks, then merges the partial results by log-sum-exp, in fp32:

    lse = logaddexp(lse_a, lse_b),   out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

zigzag (default): the sequence is cut into 2P chunks and rank r holds chunks r
and 2P-1-r, so every rank does the same causal work; contiguous: rank r holds
chunk r; a parallel.sharding.Split: any m chunks per rank (parallel.balance's
per-batch assignment for packed documents). Every chunk is its own query/key
chunk with its own global offset.
A (query chunk, key chunk) tile is skipped when the key chunk lies wholly in
the causal future or the layout activates no block of it (S2 heads never
visit most distant chunks), so the work follows the sparsity pattern.

Packed documents (doc_ids, this rank's shard [B, n] of non-decreasing ids):
one all-gather of the ids per call gives the whole row, and every tile's
kernel call (forward and tile backward) gets the ids of its query and key
chunks as q_doc / k_doc. A tile whose key chunk holds no document of its query
chunk is left to the kernel, which skips every block pair of it before
loading K/V (on the GPU each program's binary search over its key list finds
no tile to visit; the CPU path drops the pairs when it plans): deciding it here
would read the ids on the host, a device sync per call on CUDA, and the plan is
cached per layout while the ids change every step.

Planning the tiles reads the layout on the host; every tile is kept with the
layout once built (`chunk_tile`) and a named split's plan too (`cached_plan`), so
a static layout is planned once per sequence length and chunking, and a later
call reads nothing on the host (the CPU reference kernels plan their own work on the host; the
Triton kernels do not); on CUDA the p2p works are waited on the stream
(NCCL), never polled.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from ltrain.kernels import BlockLayout, block_sparse_attention, block_sparse_attention_backward
from ltrain.kernels.lse import merge_lse

from . import comm
from .sharding import Split, as_split, check_sharded_qkv, check_split, gather_doc_ids

# A ring step that waits longer than this on its neighbour has lost a rank (or
# gloo p2p hung, as reported elsewhere): fail with a message, not a silent hang.
P2P_TIMEOUT = timedelta(minutes=5)
_KV_TAG, _DKV_TAG = 0, 1


class Tile(NamedTuple):
    """One (local query chunk, visiting key chunk) pair: slices into the local
    q and the visiting K/V, their global token offsets, and the tile's layout."""

    q: slice
    k: slice
    q_start: int
    k_start: int
    layout: BlockLayout


def chunk_tile(layout: BlockLayout, device: torch.device, num_chunks: int, qi: int, ki: int) -> BlockLayout | None:
    """The sub-layout of (query chunk qi, key chunk ki) of the sequence cut into num_chunks
    chunks, on `device`, or None when the tile is causally dead (ki > qi) or empty. Built on
    first use and kept with the layout (BlockLayout.cached): one host sync per tile per
    layout, never per step, whatever split asks for it (a balanced split changes every
    batch, its tiles do not), and the tile's own cached views (the Triton backward's
    transposed layout) live as long as the layout. At most every causal tile of one
    chunking is kept: about one block mask of the layout, as int32."""
    if ki > qi:
        return None

    def build():
        cb = layout.num_q_blocks // num_chunks
        on_device = layout.cached(("on", device), lambda: layout.to(device))  # one copy, not one per tile
        sub = on_device.sub(qi * cb, cb, ki * cb, cb)
        return None if sub.is_empty() else sub

    return layout.cached(("ring_tile", device, num_chunks, qi, ki), build)


def ring_plan(layout: BlockLayout, cp_rank: int, cp: int, mode, block_size: int,
              device: torch.device | None = None) -> list[list[Tile]]:
    """plan[src]: the tiles this rank computes while it holds rank src's K/V.

    layout covers the full sequence in global block coordinates (M = N / block_size
    blocks); mode: the split ("zigzag", "contiguous" or a parallel.sharding.Split).
    Tiles whose key chunk is wholly in the causal future, or whose sub-layout is
    empty, are left out (chunk_tile: decided once per tile and layout)."""
    split = as_split(mode, cp)
    C = split.num_chunks
    c = layout.num_q_blocks // C * block_size
    device = layout.device if device is None else device
    plan = []
    for src in range(cp):
        tiles = []
        for a, qi in enumerate(split.chunks[cp_rank]):
            for b, ki in enumerate(split.chunks[src]):
                sub = chunk_tile(layout, device, C, qi, ki)
                if sub is not None:
                    tiles.append(Tile(slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), qi * c, ki * c, sub))
        plan.append(tiles)
    return plan


def cached_plan(layout: BlockLayout, device: torch.device, cp_rank: int, cp: int, mode,
                block_size: int) -> list[list[Tile]]:
    """ring_plan of `layout` on `device`. A named split's plan ("zigzag", "contiguous") is kept
    with the layout per (device, rank, cp, mode, block_size): a caller that keeps its layout
    (the dispatcher's causal one, S2's) plans once per sequence length. A Split (a per-batch
    balanced assignment) is planned per call from the kept tiles: host work only, a few
    list lookups per tile, no host sync."""
    if isinstance(mode, Split):
        return ring_plan(layout, cp_rank, cp, mode, block_size, device)
    return layout.cached(("ring_plan", device, cp_rank, cp, mode, block_size),
                         lambda: ring_plan(layout, cp_rank, cp, mode, block_size, device))


def _shift(send: torch.Tensor, group, tag: int, what: str):
    """Post send -> next rank and recv <- previous rank; returns (recv buffer, works).
    Even ranks send first, odd ranks receive first, so a backend whose p2p
    blocks until matched (NCCL without batching) cannot deadlock the ring."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = dist.get_global_rank(group, (r + 1) % P), dist.get_global_rank(group, (r - 1) % P)
    recv = torch.empty_like(send)
    post = [lambda: comm.isend(send, nxt, group=group, tag=tag), lambda: comm.irecv(recv, prv, group=group, tag=tag)]
    try:
        works = [op() for op in (post if r % 2 == 0 else post[::-1])]
    except RuntimeError as exc:  # gloo refuses to post once a peer's socket closed
        raise _ring_broken(group, what, exc) from exc
    return recv, works


def _wait(pending, group, what: str):
    """The received buffer, once it may be used. CUDA (NCCL): a plain wait, which
    orders the current stream after the transfer and returns (a wait with a timeout
    would busy-poll the host until the transfer ends; NCCL's watchdog bounds a hang).
    CPU (gloo, no watchdog): a bounded wait, so a lost rank fails with a message."""
    recv, works = pending
    try:
        for w in works:
            if recv.is_cuda:
                w.wait()
            else:
                w.wait(timeout=P2P_TIMEOUT)
    except RuntimeError as exc:
        raise _ring_broken(group, what, exc) from exc
    return recv


def _ring_broken(group, what: str, exc: RuntimeError) -> RuntimeError:
    """One message for both ways a ring breaks: a peer that never answers
    (timeout) and a peer whose process died (closed connection)."""
    r, P = dist.get_rank(group), dist.get_world_size(group)
    cause = f"timed out after {P2P_TIMEOUT}" if "timed out" in str(exc).lower() else "lost the connection"
    return RuntimeError(f"ring_attention: rank {r} of {P} {cause} exchanging {what} with ranks {(r - 1) % P} and "
                        f"{(r + 1) % P} (a rank left the ring or p2p hung; the rank's own log says why)")


def _tile_docs(docs, t: Tile) -> dict:
    """q_doc / k_doc of tile t from the whole row's doc ids docs [B, N] (None: no documents)."""
    if docs is None:
        return {}
    return dict(q_doc=docs[:, t.q_start:t.q_start + t.q.stop - t.q.start],
                k_doc=docs[:, t.k_start:t.k_start + t.k.stop - t.k.start])


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, group, opts, docs):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        # fp32 whatever q's dtype: the merged output and lse take one term per tile and ring step
        # (up to 2P tiles per query chunk), and a half-precision running merge would round after
        # every one of them; here each tile's output is rounded once (the kernel returns q.dtype),
        # its weight exp(lse_t - lse) and the sum are fp32, and out is rounded once, at the end.
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        kv = torch.stack([k, v])
        for step in range(P):
            # Next K/V is in flight while this one is used (double buffer: kv and the recv buffer).
            pending = _shift(kv, group, _KV_TAG, "K/V") if step < P - 1 else None
            for t in plan[(r - step) % P]:
                out_t, lse_t = block_sparse_attention(q[:, :, t.q], kv[0][:, :, t.k], kv[1][:, :, t.k], t.layout,
                                                      q_start=t.q_start, k_start=t.k_start, return_lse=True,
                                                      **opts, **_tile_docs(docs, t))
                out[:, :, t.q], lse[:, :, t.q] = merge_lse(out[:, :, t.q], lse[:, :, t.q], out_t.float(), lse_t)
            if pending is not None:
                kv = _wait(pending, group, "K/V")
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.group, ctx.opts, ctx.docs = plan, group, opts, docs
        return out

    @staticmethod
    def backward(ctx, do):
        """Per tile, the kernel's own backward from the merged output's row statistics,
        as ring-flash-attn does: with the whole sequence's lse_i and delta_i = do_i . o_i,

            p_ij = exp(s_ij - lse_i),   ds_ij = p_ij (do_i . v_j - delta_i)

        are exactly the probabilities and score gradients of attention over the whole
        sequence, restricted to the tile's keys; so the tiles' dq add up, and no tile's
        forward is re-run. dK/dV of the visiting block accumulate in fp32 and travel
        the ring one step behind their K/V, arriving back at their owner after P steps."""
        q, k, v, out, lse = ctx.saved_tensors
        group, opts = ctx.group, ctx.opts
        P, r = dist.get_world_size(group), dist.get_rank(group)
        delta = (do.float() * out.float()).sum(-1)
        # dq and the travelling dK/dV sum one tile term per ring step (dK/dV of a block: terms
        # from every rank it visits), so both accumulate, and dK/dV travel the ring, in fp32: a
        # half-precision accumulator would round P times (the error growing with cp); here
        # each tile's term is rounded once (the kernel returns q.dtype) and the sum once, at the end.
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        in_flight = None  # dK/dV accumulator of the visiting block, coming from the previous rank
        for step in range(P):
            pending = _shift(kv, group, _KV_TAG, "K/V") if step < P - 1 else None
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
            for t in ctx.plan[(r - step) % P]:
                dq_t, dk_t, dv_t = _tile_backward(do, q, kv, lse, delta, t, {**opts, **_tile_docs(ctx.docs, t)})
                dq[:, :, t.q] += dq_t
                dkv[0][:, :, t.k] += dk_t
                dkv[1][:, :, t.k] += dv_t
            if in_flight is not None:
                dkv += _wait(in_flight, group, "dK/dV")
            if pending is not None:
                kv = _wait(pending, group, "K/V")
            if P > 1:
                in_flight = _shift(dkv, group, _DKV_TAG, "dK/dV")
        if in_flight is not None:
            dkv = _wait(in_flight, group, "dK/dV")
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def _tile_backward(do, q, kv, lse, delta, t: Tile, opts):
    """(dq, dk, dv) of one tile from the whole sequence's lse and delta.
    do, q: [B, Hq, n, D] (q.dtype); kv: [2, B, Hkv, n, D] the visiting K/V; lse, delta: [B, Hq, n] fp32;
    opts: the kernel's options, the tile's q_doc / k_doc included."""
    return block_sparse_attention_backward(do[:, :, t.q], q[:, :, t.q], kv[0][:, :, t.k], kv[1][:, :, t.k],
                                           lse[:, :, t.q], delta[:, :, t.q], t.layout, causal=True,
                                           q_start=t.q_start, k_start=t.k_start, **opts)


def ring_attention(q, k, v, *, layout_fn: Callable[[int], BlockLayout], group, block_size: int = 64,
                   sm_scale: float | None = None, mode="zigzag", impl: str = "auto", doc_ids=None):
    """Causal block-sparse attention over a sequence sharded across `group`.

    q: [B, Hq, n, D], k, v: [B, Hkv, n, D] -- this rank's shard of a sequence
    of N = n * P tokens, split by `shard_sequence(..., mode=mode)` (Hq a
    multiple of Hkv). layout_fn(M) -> BlockLayout over the full sequence in
    global block coordinates, M = N / block_size (e.g. `lambda m:
    BlockLayout.causal(m, m)` for dense, `lambda m: s2_layout(H, m * bs, ...)`
    for S2); it is called once per call, so cache it when it is static: the
    tile plan is kept with the layout object it returns (cached_plan).
    group: the context-parallel group (None: the default group).

        o_i = sum_{j visible, block active} softmax_j(sm_scale * q_i . k_j) v_j

    with visibility by global position and, given doc_ids (this rank's shard [B, n]
    of the packed row's document ids, non-decreasing along the whole row, split
    like q), within one document. Returns o [B, Hq, n, D] in q.dtype, in
    the same (sharded) order as q. mode: "zigzag", "contiguous" or a
    parallel.sharding.Split; N must divide into its C chunks of whole blocks.
    """
    group = group if group is not None else dist.group.WORLD
    check_sharded_qkv(q, k, v, mode)
    P = dist.get_world_size(group)
    N = q.shape[2] * P
    check_split(N, P, mode, block_size, who="ring_attention")
    M = N // block_size
    layout = layout_fn(M)
    if layout.num_q_blocks != M or layout.num_k_blocks != M:
        raise ValueError(f"layout_fn({M}) returned a {layout.num_q_blocks} x {layout.num_k_blocks}-block layout; "
                         f"it must cover the whole sequence: {M} x {M} blocks of {block_size}")
    plan = cached_plan(layout, q.device, dist.get_rank(group), P, mode, block_size)
    opts = dict(block_size=block_size, sm_scale=sm_scale, impl=impl)
    docs = gather_doc_ids(doc_ids, q, group, mode=mode, who="ring_attention")  # the whole row [B, N]
    return _RingAttention.apply(q, k, v, plan, group, opts, docs)
