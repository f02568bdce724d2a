"""CPU path for per-token selections (InfLLM-V2's rule): every query token has
its own list of key blocks, shared by the G query heads of its KV group.

The layout is a BlockLayout whose rows are tokens: counts [Bl, Hl, Nq],
indices [Bl, Hl, Nq, K], Hl in {1, Hkv}. For query i (global q_start + i)

    s_ij = sm_scale * q_i . k_j  for j in the blocks selected for i, visible (k_start + j <= q_start + i)
    lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j

How: neighbouring tokens mostly agree (the init and local blocks are forced
for every token of a query block, and trained queries of one block pick
similar blocks), so the selection of each token is split into

    common: the blocks that EVERY token of its query block selected, a
            block-granular layout solved by block_sparse_cpu (bands of the
            local window, gathered picks: fast fused kernels);
    rest:   the token's other blocks, gathered per token ([G, R * bs] scores
            per token and KV group, only for tokens that have any).

With document ids (q_doc [B, Nq], k_doc [B, Nk]) the common part skips and
masks by block as block_sparse_cpu does (doc_split), and the rest part adds
q_doc_i == k_doc_j to its per-token visibility mask.

Both are exact for their keys; the two (out, lse) pairs merge through lse,
and in the backward both take the overall lse and delta, so their dq add up
and their dK/dV accumulate by block. Nothing of size Nq x Nk exists; the
split costs one [Bl, Hl, Nq / bs, Mk] count tensor.
"""

from __future__ import annotations

import torch

from . import block_sparse_cpu
from .block_sparse_cpu import GROUP_ELEMENTS
from .lse import merge_lse
from .layout import BlockLayout


def split(layout: BlockLayout, block_size: int) -> tuple[BlockLayout, BlockLayout]:
    """Per-token layout [Bl, Hl, Nq, K] -> (common [Bl, Hl, Nq / bs, *] block
    layout, rest [Bl, Hl, Nq, *] per-token layout): every selected block of a
    token is in exactly one of them."""
    Bl, Hl, Nq, K = layout.indices.shape
    mk, mq = layout.num_k_blocks, Nq // block_size
    idx = torch.where(layout.indices >= 0, layout.indices, mk).long()
    hits = torch.zeros(Bl, Hl, mq, mk + 1, dtype=torch.int32, device=layout.device)
    hits.scatter_add_(-1, idx.view(Bl, Hl, mq, block_size * K), torch.ones_like(idx, dtype=torch.int32).view(Bl, Hl, mq, -1))
    hits[..., mk] = 0  # padding is never common
    # Token t's slot s is common iff hits[t // bs, idx[t, s]] == bs (a token lists a block at
    # most once): gathered per query block, no [Nq, Mk] tensor.
    in_common = (hits.gather(-1, idx.view(Bl, Hl, mq, -1)) == block_size).view(Bl, Hl, Nq, K)
    rest = BlockLayout.from_indices(torch.where(in_common, -1, layout.indices), mk)
    width = int(rest.counts.max()) if rest.counts.numel() else 0
    rest = BlockLayout(rest.counts, rest.indices[..., :width].contiguous(), mk)
    # The common blocks are among every token's, so the first token of each block lists them all.
    first = in_common[:, :, ::block_size]
    common = BlockLayout.from_indices(torch.where(first, layout.indices[:, :, ::block_size], -1), mk)
    return common, rest


def split_cached(layout: BlockLayout, block_size: int) -> tuple[BlockLayout, BlockLayout]:
    """split(), computed once per layout: the forward and the backward of one
    step share it (stored beside the layout's other cached views)."""
    cache = layout.__dict__.setdefault("_token_split", {})
    if block_size not in cache:
        cache[block_size] = split(layout, block_size)
    return cache[block_size]


class _Rest:
    """The rest part as rows (b, KV head, token) with at least one block:
    rows [n] into [B * Hkv * Nq], blocks [n, R] flat ids into the K/V blocks
    [B * Hkv * Mk] (-1 padding mapped to block 0 and masked), and the key
    positions' visibility mask [n, R * bs] (causality and, given q_doc [B, Nq] and k_doc [B, Nk],
    one document)."""

    def __init__(self, q, k, rest: BlockLayout, *, block_size, causal, q_start, k_start, q_doc=None, k_doc=None):
        B, Hkv, Nk, _ = k.shape
        Nq, mk, bs = q.shape[2], rest.num_k_blocks, block_size
        counts = rest.counts.expand(B, Hkv, Nq).reshape(-1)
        self.rows = counts.nonzero()[:, 0]
        idx = rest.indices.expand(B, Hkv, Nq, -1).reshape(B * Hkv * Nq, -1).index_select(0, self.rows).long()
        base = (self.rows // Nq) * mk  # (b * Hkv + h) * mk
        self.blocks = base[:, None] + idx.clamp_min(0)
        key = (idx[..., None] * bs + torch.arange(bs, device=q.device)).flatten(1)  # [n, R * bs] local key index
        ok = (idx >= 0).repeat_interleave(bs, 1)
        if causal:
            ok &= k_start + key <= (q_start + self.rows % Nq)[:, None]
        if q_doc is not None:
            b = self.rows // (Hkv * Nq)
            ok &= k_doc.view(-1)[b[:, None] * Nk + key] == q_doc.view(-1)[b * Nq + self.rows % Nq][:, None]
        self.ok = ok

    def chunks(self, head_dim: int, block_size: int):
        width = max(1, self.blocks.shape[1] * block_size * head_dim)
        step = max(1, GROUP_ELEMENTS // width)
        for a in range(0, len(self.rows), step):
            yield slice(a, a + step)


def _rows(x: torch.Tensor, G: int) -> torch.Tensor:
    """[B, Hq, Nq, *rest] -> [B * Hkv * Nq, G, *rest]: one row per (b, KV head, token)."""
    B, Hq, Nq, *rest = x.shape
    return x.reshape(B, Hq // G, G, Nq, *rest).transpose(2, 3).reshape(B * (Hq // G) * Nq, G, *rest)


def _unrows(x: torch.Tensor, B: int, Nq: int) -> torch.Tensor:
    rows, G, *rest = x.shape
    return x.reshape(B, rows // (B * Nq), Nq, G, *rest).transpose(2, 3).reshape(B, -1, Nq, *rest)


def _gathered_kv(k, v, blocks, block_size):
    D = k.shape[-1]
    kb, vb = k.reshape(-1, block_size, D), v.reshape(-1, block_size, D)
    n, flat = blocks.shape[0], blocks.reshape(-1)
    return kb.index_select(0, flat).view(n, -1, D), vb.index_select(0, flat).view(n, -1, D)


def _rest_forward(q, k, v, part: _Rest, *, block_size, sm_scale):
    """(o [B*Hkv*Nq, G, D], lse [B*Hkv*Nq, G]) of the rest part; rows without blocks keep o 0, lse -inf."""
    G = q.shape[1] // k.shape[1]
    qr = _rows(q, G)
    out = torch.zeros_like(qr)
    lse = torch.full(qr.shape[:-1], float("-inf"), device=q.device)
    for c in part.chunks(q.shape[-1], block_size):
        rows = part.rows[c]
        kx, vx = _gathered_kv(k, v, part.blocks[c], block_size)
        s = (qr.index_select(0, rows) @ kx.transpose(1, 2) * sm_scale).masked_fill(~part.ok[c][:, None], float("-inf"))
        l = torch.logsumexp(s, -1)
        p = torch.exp(s - l.masked_fill(l == float("-inf"), 0.0)[..., None])
        out.index_copy_(0, rows, p @ vx)
        lse.index_copy_(0, rows, l)
    return out, lse


def forward(q, k, v, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float, q_start: int, k_start: int,
            q_doc=None, k_doc=None):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D], per-token layout, document ids q_doc [B, Nq], k_doc [B, Nk]
    or None -> out [B, Hq, Nq, D] (q.dtype), lse [B, Hq, Nq] fp32."""
    B, Nq, G = q.shape[0], q.shape[2], q.shape[1] // k.shape[1]
    pos = dict(block_size=block_size, causal=causal, q_start=q_start, k_start=k_start, q_doc=q_doc, k_doc=k_doc)
    opts = dict(sm_scale=sm_scale, **pos)
    common, rest = split_cached(layout, block_size)
    qf, kf, vf = q.float(), k.float(), v.float()  # the reference computes in fp32; its parts stay fp32 until the end
    o1, l1 = block_sparse_cpu.forward(qf, kf, vf, common, **opts)
    part = _Rest(qf, kf, rest, **pos)
    o2, l2 = _rest_forward(qf, kf, vf, part, block_size=block_size, sm_scale=sm_scale)
    out, lse = merge_lse(_rows(o1, G), _rows(l1, G), o2, l2)  # fp32 merge of the two parts
    return _unrows(out, B, Nq).to(q.dtype), _unrows(lse, B, Nq)


def backward(do, q, k, v, lse, delta, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float,
             q_start: int, k_start: int, q_doc=None, k_doc=None):
    """Gradients from the overall lse and delta_i = do_i . o_i - dlse_i ([B, Hq, Nq] fp32), for both parts:

        p_ij = exp(s_ij - lse_i),  dv_j += sum_i p_ij do_i,  ds_ij = p_ij (do_i . v_j - delta_i),
        dq_i += sm_scale sum_j ds_ij k_j,  dk_j += sm_scale sum_i ds_ij q_i
    """
    B, Nq, D, G = q.shape[0], q.shape[2], q.shape[3], q.shape[1] // k.shape[1]
    pos = dict(block_size=block_size, causal=causal, q_start=q_start, k_start=k_start, q_doc=q_doc, k_doc=k_doc)
    opts = dict(sm_scale=sm_scale, **pos)
    common, rest = split_cached(layout, block_size)
    # fp32 throughout: the rest part's dq, dK/dV are index_add_-ed onto the common part's fp32
    # gradients (block_sparse_cpu.backward is given fp32 inputs, so it returns fp32), rounded once.
    qf, kf, vf = q.float(), k.float(), v.float()
    dq, dk, dv = (t.contiguous() for t in block_sparse_cpu.backward(do.float(), qf, kf, vf, lse, delta, common, **opts))
    part = _Rest(qf, kf, rest, **pos)
    qr, dor = _rows(qf, G), _rows(do.float(), G)
    lser, deltar = _rows(lse.masked_fill(lse == float("-inf"), 0.0), G), _rows(delta, G)
    dqr = torch.zeros_like(qr)
    dkb, dvb = dk.view(-1, block_size * D), dv.view(-1, block_size * D)
    for c in part.chunks(D, block_size):
        rows = part.rows[c]
        kx, vx = _gathered_kv(kf, vf, part.blocks[c], block_size)
        qx, dox = qr.index_select(0, rows), dor.index_select(0, rows)
        s = (qx @ kx.transpose(1, 2) * sm_scale).masked_fill(~part.ok[c][:, None], float("-inf"))
        p = torch.exp(s - lser.index_select(0, rows)[..., None])  # [n, G, R * bs]
        ds = p * (dox @ vx.transpose(1, 2) - deltar.index_select(0, rows)[..., None])
        dqr.index_add_(0, rows, ds @ kx * sm_scale)
        flat = part.blocks[c].reshape(-1)
        dkb.index_add_(0, flat, (ds.transpose(1, 2) @ qx * sm_scale).reshape(-1, block_size * D))
        dvb.index_add_(0, flat, (p.transpose(1, 2) @ dox).reshape(-1, block_size * D))
    dq = dq + _unrows(dqr, B, Nq)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
