"""Triton block-sparse flash attention (FlashAttention-2 recurrence), forward
and backward, visiting only the active blocks of a BlockLayout.

Same contract as block_sparse_ref (the oracle; equations in block_sparse_cpu). Three kernels:

- forward, one program per (query block, batch x query head): loops over the
  layout's key blocks with the online softmax
      m' = max(m, rowmax s), l' = l e^(m - m') + rowsum e^(s - m'), acc' = acc e^(m - m') + e^(s - m') v
  (in base 2), and stores o = acc / l and lse = m + log l.
- dq, one program per (query block, batch x query head): same loop, recomputes
  p = exp(s - lse) and accumulates dq = sm_scale sum ds k.
- dk/dv, one program per (key block, batch x KV head): walks the reverse index
  (key block -> query blocks, `layout.transposed`, cached on the layout) for
  each of the G query heads of its GQA group and accumulates dk, dv in
  registers. Every output block has exactly one writer, so there are no
  atomics and the backward is deterministic.

An empty row keeps m = -inf; exponents use m_safe = 0 there so exp2(-inf) = 0
replaces the NaN of -inf - -inf, giving o = 0, lse = -inf and zero gradients.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import BlockLayout

HEAD_DIMS = (32, 64, 128)
LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    # The Triton interpreter (numpy) multiplies bf16 operands as raw bits; it
    # gets fp32 there (PRECISION "interpret"), compiled kernels keep bf16.
    if PRECISION == "interpret":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _query_block(Counts, Indices, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                 stride_cb, stride_ch, stride_ib, stride_ih, stride_im, H, G, LAYOUT_HEAD_DIV,
                 BLOCK: tl.constexpr, D: tl.constexpr):
    """The program's query block (program ids: query block, batch x query head): its row
    offsets, q/o tile offsets, its KV head's base offset, and its layout row (count, indices)."""
    qb = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    lh = h // LAYOUT_HEAD_DIV
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    kv_base = b * stride_kb + (h // G) * stride_kh
    count = tl.load(Counts + b * stride_cb + lh * stride_ch + qb)
    idx_ptr = Indices + b * stride_ib + lh * stride_ih + qb * stride_im
    return offs_m, offs_d, q_off, kv_base, count, idx_ptr


@triton.jit
def _scores(q, k, offs_m, offs_k, scale_log2, q_start, k_start, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """s = q k^T scale in base 2, -inf above the diagonal of global positions when CAUSAL."""
    s = _dot(q, tl.trans(k), PRECISION) * scale_log2
    if CAUSAL:
        s = tl.where((q_start + offs_m)[:, None] >= (k_start + offs_k)[None, :], s, float("-inf"))
    return s


@triton.jit
def _softmax_step(m_i, l_i, acc, s, v, PRECISION: tl.constexpr):
    """One online-softmax update (base 2) with key tile scores s and values v; m_safe = 0
    on rows still empty keeps exp2(-inf - -inf) from making NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _softmax_result(m_i, l_i, acc):
    """(o, natural-log lse) of the finished rows. A non-empty row has l >= 1 (its max
    term is 2^0); an empty row has acc = 0, so o = 0 and lse = -inf."""
    out = acc / tl.maximum(l_i, 1.0)[:, None]
    return out, tl.where(l_i > 0, (m_i + tl.log2(tl.maximum(l_i, 1.0))) / 1.4426950408889634, float("-inf"))


@triton.jit
def _attend_blocks(q, K, V, kv_base, idx_ptr, count, rows, stride_kn, scale_log2, q_start, k_start,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr):
    """(o, lse) of the q rows (query positions `rows`) over the `count` key blocks listed
    at idx_ptr: the forward loop that block and token kernels share."""
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    for i in range(count):
        offs_k = tl.load(idx_ptr + i) * BLOCK + offs_n
        kv_off = kv_base + offs_k[:, None] * stride_kn + offs_d[None, :]
        s = _scores(q, tl.load(K + kv_off), rows, offs_k, scale_log2, q_start, k_start, CAUSAL, PRECISION)
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, tl.load(V + kv_off), PRECISION)
    return _softmax_result(m_i, l_i, acc)


@triton.jit
def _dq_blocks(q, do, lse, delta, K, V, kv_base, idx_ptr, count, rows, stride_kn, scale_log2, q_start, k_start,
               ROWS: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
               PRECISION: tl.constexpr):
    """sum_j ds_ij k_j (dq before sm_scale) of the q rows over the same key blocks,
    from their saved lse (base 2) and delta: the dq loop block and token kernels share."""
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    dq = tl.zeros([ROWS, D], tl.float32)
    for i in range(count):
        offs_k = tl.load(idx_ptr + i) * BLOCK + offs_n
        kv_off = kv_base + offs_k[:, None] * stride_kn + offs_d[None, :]
        k = tl.load(K + kv_off)
        v = tl.load(V + kv_off)
        s = _scores(q, k, rows, offs_k, scale_log2, q_start, k_start, CAUSAL, PRECISION)
        p = tl.exp2(s - lse[:, None])
        ds = p * (_dot(do, tl.trans(v), PRECISION) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def _row_stats(Lse, Delta, row_off):
    """Saved lse (base 2; an empty row's -inf becomes 0 so that p = 0, not NaN) and delta of the rows."""
    lse = tl.load(Lse + row_off) * 1.4426950408889634
    return tl.where(lse == float("-inf"), 0.0, lse), tl.load(Delta + row_off)


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, Counts, Indices,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_im,
                H, G, LAYOUT_HEAD_DIV, N_Q, scale_log2, q_start, k_start,
                BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    offs_m, offs_d, q_off, kv_base, count, idx_ptr = _query_block(
        Counts, Indices, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_cb, stride_ch,
        stride_ib, stride_ih, stride_im, H, G, LAYOUT_HEAD_DIV, BLOCK, D)
    out, lse = _attend_blocks(tl.load(Q + q_off), K, V, kv_base, idx_ptr, count, offs_m, stride_kn, scale_log2,
                              q_start, k_start, BLOCK, BLOCK, D, CAUSAL, PRECISION)
    tl.store(Out + q_off, out.to(Out.dtype.element_ty))
    tl.store(Lse + tl.program_id(1) * N_Q + offs_m, lse)


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, Lse, Delta, Counts, Indices,
               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
               stride_cb, stride_ch, stride_ib, stride_ih, stride_im,
               H, G, LAYOUT_HEAD_DIV, N_Q, sm_scale, scale_log2, q_start, k_start,
               BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    offs_m, offs_d, q_off, kv_base, count, idx_ptr = _query_block(
        Counts, Indices, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_cb, stride_ch,
        stride_ib, stride_ih, stride_im, H, G, LAYOUT_HEAD_DIV, BLOCK, D)
    lse, delta = _row_stats(Lse, Delta, tl.program_id(1) * N_Q + offs_m)
    dq = _dq_blocks(tl.load(Q + q_off), tl.load(DO + q_off), lse, delta, K, V, kv_base, idx_ptr, count, offs_m,
                    stride_kn, scale_log2, q_start, k_start, BLOCK, BLOCK, D, CAUSAL, PRECISION)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty))


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta, RCounts, RIndices,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_cb, stride_ch, stride_ib, stride_ih, stride_im,
                 H_KV, G, LAYOUT_HEAD_DIV, N_Q, sm_scale, scale_log2, q_start, k_start,
                 BLOCK: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    kb = tl.program_id(0)
    b = tl.program_id(1) // H_KV
    hkv = tl.program_id(1) % H_KV
    offs_k = kb * BLOCK + tl.arange(0, BLOCK)
    offs_m0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    kv_off = b * stride_kb + hkv * stride_kh + offs_k[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(K + kv_off)
    v = tl.load(V + kv_off)

    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    for g in range(G):
        h = hkv * G + g
        lh = h // LAYOUT_HEAD_DIV
        count = tl.load(RCounts + b * stride_cb + lh * stride_ch + kb)
        idx_ptr = RIndices + b * stride_ib + lh * stride_ih + kb * stride_im
        q_base = b * stride_qb + h * stride_qh
        for i in range(count):
            offs_m = tl.load(idx_ptr + i) * BLOCK + offs_m0
            q_off = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
            q = tl.load(Q + q_off)
            do = tl.load(DO + q_off)
            lse, delta = _row_stats(Lse, Delta, (b * H_KV * G + h) * N_Q + offs_m)
            s = _scores(q, k, offs_m, offs_k, scale_log2, q_start, k_start, CAUSAL, PRECISION)
            p = tl.exp2(s - lse[:, None])
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
            dp = _dot(do, tl.trans(v), PRECISION)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty))


def _layout_args(layout: BlockLayout):
    """Strides of counts/indices; batch stride 0 broadcasts a shared layout."""
    counts, indices = layout.counts, layout.indices
    shared = counts.shape[0] == 1
    return (0 if shared else counts.stride(0), counts.stride(1),
            0 if shared else indices.stride(0), indices.stride(1), indices.stride(2))


def _common(q, k, layout: BlockLayout, block_size: int):
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    Hl = layout.counts.shape[1]
    # Layout head of query head h is h // div: Hl == Hq -> h, Hl == Hkv -> h // G, Hl == 1 -> 0.
    div = 1 if Hl == Hq else (G if Hl == Hkv else Hq)
    num_warps = 8 if block_size * D >= 128 * 128 else 4
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        precision = "interpret"
    else:
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return B, Hq, Nq, D, Hkv, G, div, num_warps, precision


def forward(q, k, v, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float, q_start: int, k_start: int):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D] (contiguous) -> out [B, Hq, Nq, D], lse [B, Hq, Nq] fp32."""
    B, Hq, Nq, D, Hkv, G, div, num_warps, precision = _common(q, k, layout, block_size)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    grid = (Nq // block_size, B * Hq)
    _fwd_kernel[grid](q, k, v, out, lse, layout.counts, layout.indices,
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      *_layout_args(layout), Hq, G, div, Nq, sm_scale * LOG2E, q_start, k_start,
                      BLOCK=block_size, D=D, CAUSAL=causal, PRECISION=precision, num_warps=num_warps)
    return out, lse


def backward(do, q, k, v, lse, delta, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float,
             q_start: int, k_start: int):
    """do: [B, Hq, Nq, D], lse and delta = do . o - dlse: [B, Hq, Nq] fp32 -> dq, dk, dv."""
    B, Hq, Nq, D, Hkv, G, div, num_warps, precision = _common(q, k, layout, block_size)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    meta = dict(BLOCK=block_size, D=D, CAUSAL=causal, PRECISION=precision, num_warps=num_warps)
    _dq_kernel[(Nq // block_size, B * Hq)](q, k, v, do, dq, lse, delta, layout.counts, layout.indices, *strides,
                                           *_layout_args(layout), Hq, G, div, Nq, sm_scale, sm_scale * LOG2E,
                                           q_start, k_start, **meta)
    rev = layout.transposed
    _dkdv_kernel[(k.shape[2] // block_size, B * Hkv)](q, k, v, do, dk, dv, lse, delta, rev.counts, rev.indices,
                                                      *strides, *_layout_args(rev), Hkv, G, div, Nq, sm_scale,
                                                      sm_scale * LOG2E, q_start, k_start, **meta)
    return dq, dk, dv
