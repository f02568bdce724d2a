"""PyTorch reference for block-sparse attention: the CPU path and the oracle
for the Triton kernel.

For query i (global position q_start + i) and the keys j of the key blocks
active for its query block (global position k_start + j):

    s_ij = sm_scale * q_i . k_j,  masked to -inf unless k_start + j <= q_start + i (causal)
    lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j

A row with no visible key has o_i = 0 and lse_i = -inf.

How: a "row" is one query block of one selection head (below). Its active
key blocks are classified against the causal rule as full (every key visible
to every query), partial (the diagonal: a token-level mask) or invisible
(dropped), and ordered full first, partial last. Rows with the same number of
kept blocks and the same partial offsets then form one dense sub-problem with
one shared [R, S] mask: their queries are stacked as a batch, each against
its own gathered K/V, and torch's fused CPU flash-attention kernel (the one
SDPA uses; it returns lse and recomputes in its backward) solves it. Memory
stays proportional to the active blocks (at most GROUP_ELEMENTS gathered
K/V elements at a time); nothing of size Nq x Nk exists. Compute is fp32
whatever the input dtype.

Heads are processed as "selection heads" s: with a per-query-head layout every
query head is its own selection head; with a shared (per-KV-head or global)
layout the Gs = Hq / Hkv query heads of a GQA group are stacked as extra rows
of one selection head, so each K/V block is gathered once per group.
"""

from __future__ import annotations

import torch

from .layout import BlockLayout

# Gathered K (or V) elements per sub-problem batch: bounds the working set to a few x 32 MiB.
GROUP_ELEMENTS = 1 << 23

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _selection_heads(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout) -> tuple[int, int]:
    """(Hs, Gs): selection heads and query heads stacked in each."""
    Hq, Hkv = q.shape[1], k.shape[1]
    hs = Hq if layout.counts.shape[1] == Hq else Hkv
    return hs, Hq // hs


def _plan(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout):
    """Map query heads onto selection heads: returns the KV head of each
    selection head and counts/indices [B, Hs, Mq(, K)]."""
    B, Hq = q.shape[:2]
    hs, gs = _selection_heads(q, k, layout)
    dev = q.device
    kv_of_s = torch.arange(hs, device=dev) // (hs // k.shape[1])
    if layout.counts.shape[1] == Hq:
        layout_of_s = torch.arange(Hq, device=dev)
    else:
        layout_of_s = kv_of_s if layout.counts.shape[1] == k.shape[1] else torch.zeros_like(kv_of_s)
    counts = layout.counts[:, layout_of_s].expand(B, hs, -1)
    indices = layout.indices[:, layout_of_s].expand(B, hs, -1, -1)
    return hs, gs, kv_of_s, counts, indices


def _group(x: torch.Tensor, hs: int, gs: int, block_size: int) -> torch.Tensor:
    """[B, Hq, N, *rest] -> [B * Hs * M, Gs * block_size, *rest]: one row per
    (batch, selection head, query block), holding all heads of the selection head."""
    B, _, N, *rest = x.shape
    x = x.reshape(B, hs, gs, N // block_size, block_size, *rest).transpose(2, 3)
    return x.reshape(B * hs * (N // block_size), gs * block_size, *rest)


def _ungroup(x: torch.Tensor, B: int, hs: int, gs: int, block_size: int) -> torch.Tensor:
    """Inverse of _group: [B * Hs * M, Gs * block_size, *rest] -> [B, Hq, N, *rest]."""
    rows, _, *rest = x.shape
    M = rows // (B * hs)
    x = x.reshape(B, hs, M, gs, block_size, *rest).transpose(2, 3)
    return x.reshape(B, hs * gs, M * block_size, *rest)


def _sub_problems(q, k, layout, *, block_size, causal, q_start, k_start):
    """Yield (rows [n], blocks [n, nk], mask [R, nk * bs] additive or None,
    blind [R] bool or None: queries that see no key at all): rows index _group(q)'s rows, blocks index k.reshape(-1, bs, D)'s blocks
    (full blocks first, partial last), and the mask applies the causal rule
    inside the partial blocks. Partial offset d = (q block start) - (k block
    start) in global tokens: key t of the block is visible to query r iff t - r <= d."""
    hs, gs, kv_of_s, counts, indices = _plan(q, k, layout)
    B, Hkv, Nk, _ = k.shape
    bs, mk, mq, width = block_size, Nk // block_size, counts.shape[2], indices.shape[3]
    dev = q.device
    if width == 0:
        return
    idx = indices.long().clamp_min(0)
    keep = torch.arange(width, device=dev) < counts[..., None]
    d = q_start - k_start + (torch.arange(mq, device=dev)[:, None] - idx) * bs
    partial = torch.zeros_like(keep)
    if causal:
        keep &= d > -bs
        partial = keep & (d < bs - 1)
    # Sort key: full blocks, then partial, then dropped; ascending block within each class.
    cls = torch.where(keep, partial.long(), 2)
    order = (cls * mk + idx).argsort(dim=-1)
    flat = (torch.arange(B, device=dev)[:, None, None, None] * Hkv + kv_of_s[None, :, None, None]) * mk + idx
    flat, d = flat.gather(-1, order).reshape(-1, width), d.gather(-1, order).reshape(-1, width)
    n_keep, n_part = keep.sum(-1).reshape(-1), partial.sum(-1).reshape(-1)
    # A partial block's offset is in (-bs, bs) and blocks differ by multiples of bs: at most 2 per row.
    slot = (n_keep - n_part)[:, None] + torch.arange(2, device=dev)
    part_d = torch.where(torch.arange(2, device=dev) < n_part[:, None], d.gather(-1, slot.clamp_max(width - 1)), 0)
    sigs, which = torch.unique(torch.cat([n_keep[:, None], n_part[:, None], part_d], 1), dim=0, return_inverse=True)
    rows_per_query_block = gs * bs
    r = torch.arange(rows_per_query_block, device=dev)[:, None] % bs
    t = torch.arange(bs, device=dev)
    for sig, members in zip(sigs.tolist(), _members(which, len(sigs))):
        nk, npart, pd = sig[0], sig[1], sig[2:2 + sig[1]]
        if nk == 0:
            continue
        mask = blind = None
        if npart:
            mask = torch.zeros(rows_per_query_block, nk * bs, device=dev)
            for p, dp in enumerate(pd):
                lo = (nk - npart + p) * bs
                mask[:, lo:lo + bs].masked_fill_(t - r > dp, float("-inf"))
            if nk == npart:
                blind = torch.isinf(mask).all(-1)
        chunk = max(1, GROUP_ELEMENTS // (nk * bs * q.shape[-1]))
        for rows in members.split(chunk):
            yield rows, flat[rows, :nk], mask, blind


def _members(which: torch.Tensor, n: int):
    """Row ids of each signature, one argsort instead of n nonzero scans."""
    order = which.argsort(stable=True)
    return order.split(torch.bincount(which, minlength=n).tolist())


def forward(q, k, v, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float, q_start: int, k_start: int):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D] -> out [B, Hq, Nq, D] (q.dtype), lse [B, Hq, Nq] fp32."""
    B, D, bs = q.shape[0], q.shape[-1], block_size
    hs, gs = _selection_heads(q, k, layout)
    qg = _group(q.float(), hs, gs, bs)
    kb, vb = k.float().reshape(-1, bs, D), v.float().reshape(-1, bs, D)
    out = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(qg.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for rows, blocks, mask, blind in _sub_problems(q, k, layout, block_size=bs, causal=causal, q_start=q_start, k_start=k_start):
        n, S = blocks.shape[0], blocks.shape[1] * bs
        flat = blocks.reshape(-1)
        o, l = _flash_fwd(qg[rows, None], kb.index_select(0, flat).view(n, 1, S, D),
                          vb.index_select(0, flat).view(n, 1, S, D), 0.0, False,
                          attn_mask=None if mask is None else mask[None, None], scale=sm_scale)
        if blind is not None:
            l[:, 0, blind] = float("-inf")  # the kernel gives such a query out 0 but lse 0
        out[rows], lse[rows] = o[:, 0], l[:, 0]
    return _ungroup(out, B, hs, gs, bs).to(q.dtype), _ungroup(lse, B, hs, gs, bs)


def _pad(x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """[..., D] -> [..., D + 1] fp32, the extra column `last` (default 0)."""
    col = torch.zeros(*x.shape[:-1], 1, device=x.device) if last is None else last[..., None]
    return torch.cat([x.float(), col], -1)


def backward(do, q, k, v, lse, delta, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float,
             q_start: int, k_start: int):
    """Gradients from the saved lse and delta_i = do_i . o_i - dlse_i ([B, Hq, Nq] fp32):

        p_ij = exp(s_ij - lse_i),  dv_j = sum_i p_ij do_i,  ds_ij = p_ij (do_i . v_j - delta_i),
        dq_i = sm_scale sum_j ds_ij k_j,  dk_j = sm_scale sum_i ds_ij q_i

    The flash kernel computes delta itself as rowsum(do * out), and we have
    delta but not out: so every head dim gets one extra column, 0 in q, k
    and v (scores and do . v unchanged), delta_i in do and 1 in out, with
    out's other columns 0; then rowsum(do * out) = delta_i exactly. dK/dV of
    a KV head accumulate over its query heads and query blocks by block index."""
    B, D, bs = q.shape[0], q.shape[-1], block_size
    hs, gs = _selection_heads(q, k, layout)
    qg, dog = _group(_pad(q), hs, gs, bs), _group(_pad(do, delta), hs, gs, bs)
    # An empty row (lse -inf) has every score -inf: lse 0 gives p = 0, no NaN.
    lseg = _group(lse.masked_fill(lse == float("-inf"), 0.0), hs, gs, bs)
    kb, vb = _pad(k).reshape(-1, bs, D + 1), _pad(v).reshape(-1, bs, D + 1)
    out_ones = torch.zeros(D + 1, device=q.device)
    out_ones[D] = 1.0
    dq = torch.zeros(qg.shape[0], qg.shape[1], D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(kb.shape[0], bs * (D + 1), dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    for rows, blocks, mask, _ in _sub_problems(q, k, layout, block_size=bs, causal=causal, q_start=q_start, k_start=k_start):
        n, S = blocks.shape[0], blocks.shape[1] * bs
        flat = blocks.reshape(-1)
        g_q, g_k, g_v = _flash_bwd(
            dog[rows, None], qg[rows, None], kb.index_select(0, flat).view(n, 1, S, D + 1),
            vb.index_select(0, flat).view(n, 1, S, D + 1),
            out_ones.expand(n, 1, qg.shape[1], D + 1), lseg[rows, None], 0.0, False,
            attn_mask=None if mask is None else mask[None, None], scale=sm_scale)
        dq[rows] = g_q[:, 0, :, :D]
        # Accumulate padded, contiguous rows (index_add_ on a sliced source is several x slower).
        dk.index_add_(0, flat, g_k.view(-1, bs * (D + 1)))
        dv.index_add_(0, flat, g_v.view(-1, bs * (D + 1)))
    dk, dv = (x.view(-1, bs, D + 1)[..., :D].reshape(k.shape).to(k.dtype) for x in (dk, dv))
    return _ungroup(dq, B, hs, gs, bs).to(q.dtype), dk, dv
