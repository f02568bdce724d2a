"""PyTorch reference for block-sparse attention: the CPU path and the oracle
for the Triton kernel.

For query i (global position q_start + i) and the keys j of the key blocks
active for its query block (global position k_start + j):

    s_ij = sm_scale * q_i . k_j,  masked to -inf unless k_start + j <= q_start + i (causal)
    lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j

A row with no visible key has o_i = 0 and lse_i = -inf.

Memory stays proportional to the active blocks: query blocks are processed in
groups, each gathering only its active K/V blocks, and the backward recomputes
the scores group by group (FlashAttention style) from the saved lse, so
nothing of size Nq x Nk ever exists. Compute is fp32 whatever the input dtype.

Heads are processed as "selection heads" s: with a per-query-head layout every
query head is its own selection head; with a shared (per-KV-head or global)
layout the Gs = Hq / Hkv query heads of a GQA group are stacked as extra rows
of one selection head, so each K/V block is gathered once per group.
"""

from __future__ import annotations

import torch

from .layout import BlockLayout

# Elements of one group's score matrix; bounds the working set to a few x 32 MiB.
GROUP_ELEMENTS = 1 << 23


def _plan(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout):
    """Map query heads onto selection heads: returns Hs, Gs, the KV head and
    layout head of each selection head, and counts/indices [B, Hs, Mq(, K)]."""
    B, Hq = q.shape[:2]
    Hkv = k.shape[1]
    Hl = layout.counts.shape[1]
    dev = q.device
    if Hl == Hq:
        hs, gs = Hq, 1
        kv_of_s = torch.arange(Hq, device=dev) // (Hq // Hkv)
        layout_of_s = torch.arange(Hq, device=dev)
    else:
        hs, gs = Hkv, Hq // Hkv
        kv_of_s = torch.arange(Hkv, device=dev)
        layout_of_s = kv_of_s if Hl == Hkv else torch.zeros_like(kv_of_s)
    counts = layout.counts[:, layout_of_s].expand(B, hs, -1)
    indices = layout.indices[:, layout_of_s].expand(B, hs, -1, -1)
    return hs, gs, kv_of_s, counts, indices


def _group(x: torch.Tensor, hs: int, gs: int, block_size: int) -> torch.Tensor:
    """[B, Hq, N, *rest] -> [B, Hs, M, Gs * block_size, *rest] (rows of a query block, all heads of a selection head)."""
    B, _, N, *rest = x.shape
    x = x.reshape(B, hs, gs, N // block_size, block_size, *rest).transpose(2, 3)
    return x.reshape(B, hs, N // block_size, gs * block_size, *rest)


def _ungroup(x: torch.Tensor, gs: int, block_size: int) -> torch.Tensor:
    B, hs, M, _, *rest = x.shape
    x = x.reshape(B, hs, M, gs, block_size, *rest).transpose(2, 3)
    return x.reshape(B, hs * gs, M * block_size, *rest)


def _group_ranges(counts: torch.Tensor, rows: int, block_size: int):
    """Yield (start, stop, K) over query blocks: groups of g query blocks sized
    for the widest row, and K = the group's largest count, so padding slots
    beyond it are never gathered."""
    B, hs, mq = counts.shape
    per_block_max = counts.amax(dim=(0, 1)).tolist()
    g = max(1, GROUP_ELEMENTS // (B * hs * rows * max(max(per_block_max), 1) * block_size))
    for start in range(0, mq, g):
        stop = min(mq, start + g)
        yield start, stop, max(per_block_max[start:stop])


def _scores(qg, k, v, kv_of_s, counts, indices, start, stop, kmax, *, block_size, causal, sm_scale, q_start, k_start):
    """Masked scores [B, Hs, g, R, K*bs] of query blocks [start, stop) against
    their gathered K/V ([B, Hs, g, K*bs, D], fp32), plus the flat block index
    [B, Hs, g, K] of each gathered block in k.view(-1, bs, D)."""
    B, Hkv, Nk, D = k.shape
    mk = Nk // block_size
    hs, rows = qg.shape[1], qg.shape[3]
    g = stop - start
    dev = k.device
    idx = indices[:, :, start:stop, :kmax]
    valid = torch.arange(kmax, device=dev) < counts[:, :, start:stop, None]
    idx = idx.clamp_min(0).long()
    flat = (torch.arange(B, device=dev)[:, None, None, None] * Hkv + kv_of_s[None, :, None, None]) * mk + idx
    kg = k.reshape(B * Hkv * mk, block_size, D)[flat].reshape(B, hs, g, kmax * block_size, D).float()
    vg = v.reshape(B * Hkv * mk, block_size, D)[flat].reshape(B, hs, g, kmax * block_size, D).float()
    s = (qg[:, :, start:stop].float() * sm_scale) @ kg.transpose(-1, -2)
    if causal:
        # Padding slots get a key position no query reaches, so one comparison
        # applies both the layout and the causal rule.
        tok = torch.arange(block_size, device=dev)
        kpos = torch.where(valid[..., None], k_start + idx[..., None] * block_size + tok, torch.iinfo(torch.long).max)
        qpos = q_start + (torch.arange(start, stop, device=dev)[:, None] * block_size + tok.repeat(rows // block_size))
        visible = kpos.reshape(B, hs, g, 1, kmax * block_size) <= qpos[:, :, None]
    else:
        visible = valid.repeat_interleave(block_size, dim=-1)[..., None, :]  # [B, Hs, g, 1, K*bs]
    s.masked_fill_(~visible, float("-inf"))
    return s, kg, vg, flat


def _scatter_matrix(flat: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Sparse one-hot [num_blocks, n]: S @ x sums the n gathered blocks of x
    into their source blocks (GQA heads and query blocks included). A sparse
    matmul is ~3x faster than index_add_ on CPU."""
    n = flat.numel()
    rows_cols = torch.stack([flat, torch.arange(n, device=flat.device)])
    return torch.sparse_coo_tensor(rows_cols, torch.ones(n, device=flat.device), (num_blocks, n),
                                   check_invariants=False)


def forward(q, k, v, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float, q_start: int, k_start: int):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D] -> out [B, Hq, Nq, D] (q.dtype), lse [B, Hq, Nq] fp32."""
    hs, gs, kv_of_s, counts, indices = _plan(q, k, layout)
    qg = _group(q, hs, gs, block_size)
    out = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(qg.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for start, stop, kmax in _group_ranges(counts, qg.shape[3], block_size):
        if kmax == 0:
            continue
        s, _, vg, _ = _scores(qg, k, v, kv_of_s, counts, indices, start, stop, kmax, block_size=block_size,
                              causal=causal, sm_scale=sm_scale, q_start=q_start, k_start=k_start)
        m = s.amax(-1, keepdim=True)
        m.masked_fill_(m == float("-inf"), 0.0)  # empty row: exp(-inf - 0) = 0, no NaN
        p = s.sub_(m).exp_()
        l = p.sum(-1, keepdim=True)
        # A non-empty row has l >= 1 (its max term is exp(0)); an empty row has p @ v = 0.
        out[:, :, start:stop] = (p @ vg) / l.clamp_min(1.0)
        lse[:, :, start:stop] = (m + l.log()).squeeze(-1)
    return _ungroup(out, gs, block_size).to(q.dtype), _ungroup(lse, gs, block_size)


def backward(do, q, k, v, lse, delta, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float,
             q_start: int, k_start: int):
    """Gradients from the saved lse and delta_i = do_i . o_i - dlse_i ([B, Hq, Nq] fp32):

        p_ij = exp(s_ij - lse_i),  dv_j = sum_i p_ij do_i,  ds_ij = p_ij (do_i . v_j - delta_i),
        dq_i = sm_scale sum_j ds_ij k_j,  dk_j = sm_scale sum_i ds_ij q_i

    dK/dV of a KV head accumulate over all its query heads and query blocks
    by the flat block index (see _scatter_matrix)."""
    hs, gs, kv_of_s, counts, indices = _plan(q, k, layout)
    qg = _group(q, hs, gs, block_size)
    dog = _group(do, hs, gs, block_size)
    lseg = _group(lse, hs, gs, block_size)
    deltag = _group(delta, hs, gs, block_size)
    B, Hkv, Nk, D = k.shape
    dq = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B * Hkv * (Nk // block_size), block_size, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    for start, stop, kmax in _group_ranges(counts, qg.shape[3], block_size):
        if kmax == 0:
            continue
        s, kg, vg, flat = _scores(qg, k, v, kv_of_s, counts, indices, start, stop, kmax, block_size=block_size,
                                  causal=causal, sm_scale=sm_scale, q_start=q_start, k_start=k_start)
        lse_blk = lseg[:, :, start:stop, :, None]
        p = s.sub_(lse_blk.masked_fill(lse_blk == float("-inf"), 0.0)).exp_()
        do_blk = dog[:, :, start:stop].float()
        scatter = _scatter_matrix(flat.reshape(-1), dk.shape[0])
        dv += torch.sparse.mm(scatter, (p.transpose(-1, -2) @ do_blk).reshape(-1, block_size * D)).view_as(dv)
        ds = p.mul_((do_blk @ vg.transpose(-1, -2)).sub_(deltag[:, :, start:stop, :, None]))
        dq[:, :, start:stop] = (ds @ kg).mul_(sm_scale)
        dk_blk = (ds.transpose(-1, -2) @ qg[:, :, start:stop].float()).mul_(sm_scale)
        dk += torch.sparse.mm(scatter, dk_blk.reshape(-1, block_size * D)).view_as(dk)
    return (_ungroup(dq, gs, block_size).to(q.dtype), dk.reshape(k.shape).to(k.dtype), dv.reshape(v.shape).to(v.dtype))
