"""Triton sparse flash attention with a key-block selection per query token
(InfLLM-V2's rule), shared by the G = Hq / Hkv query heads of a KV group.

Shapes. q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D], contiguous, D in HEAD_DIMS;
query head h reads KV head h // G. The selection is a BlockLayout whose query
dimension is tokens:

    counts:  int32 [Bl, Hl, Nq]      selected key blocks of token i
    indices: int32 [Bl, Hl, Nq, K]   their ids in 0..Nk/block_size-1, ascending, -1 after counts

Bl in {1, B}, Hl in {1, Hkv} (1 broadcasts over batch / KV groups).

Equations (global positions q_start + i, k_start + j; when causal, key j is
visible to query i iff k_start + j <= q_start + i):

    s_ij = sm_scale q_i . k_j   for j in a selected block of i and visible
    lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j
    p_ij = exp(s_ij - lse_i),  dv_j = sum_i p_ij do_i,  ds_ij = p_ij (do_i . v_j - delta_i)
    dq_i = sm_scale sum_j ds_ij k_j,  dk_j = sm_scale sum_i ds_ij q_i

with delta_i = do_i . o_i - dlse_i supplied by the caller. A row with no
visible key has o = 0, lse = -inf and zero gradients (the m_safe trick of
block_sparse_triton).

Design.

- forward and dq: one program per (query token, batch x KV head, head chunk).
  Two tokens of a group generally select different blocks, so the only rows
  that can share one K/V tile are the G heads of one token: they form the
  tile's rows. tl.dot needs M >= 16, so the rows are padded to
  BLOCK_H = max(16, next_pow2(G)), capped at MAX_BLOCK_H with a grid axis over
  head chunks so that any GQA ratio works (each chunk reads the token's K/V
  again). Padding costs tensor-core work, (BLOCK_H - G) / BLOCK_H of it
  (7/8 at G = 2), but no memory traffic: padded rows re-read the group's
  last head and are never stored. Each token reads count x block_size x D
  keys and values for only G rows, so at small G these kernels should be
  bound by K/V loads (mostly L2 hits: neighbouring tokens, adjacent in the
  grid, tend to pick the same blocks) rather than by the padded MMAs; this
  is expected, not yet measured on a GPU.
- dk/dv: one program per (key block, batch x KV head) walks a reverse index
  (key block -> tokens that selected it, `reverse_index`, built on device by a
  stable sort, no host sync, memory O(Nq K)) and accumulates dk, dv in
  registers. Every output block has exactly one writer: no atomics, and the
  result is bit-for-bit reproducible. Its tile rows are consecutive
  (token, head) pairs of that list, BLOCK_R at a time, so a tile may straddle
  tokens and padding happens once per program, not once per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_triton import (HEAD_DIMS, LOG2E, _attend_blocks, _common, _dot, _dq_blocks, _layout_args, _row_stats,
                                  _scores)
from .layout import BlockLayout

__all__ = ["HEAD_DIMS", "forward", "backward", "reverse_index"]

MIN_ROWS = 16      # tl.dot's smallest M
MAX_BLOCK_H = 64   # head rows per forward/dq program; larger groups take several head chunks
MAX_BLOCK_R = 64   # (token, head) rows per dk/dv tile, at most


def _token_config(block_h: int, block_size: int, D: int) -> dict:
    """Launch options of the forward and dq kernels. Measured for sm_90 (bf16): 4 warps
    compile without spills up to BLOCK_H x D = 32 x 128; 64 x 128 needs 8, and at
    block_size 128 two stages keep shared memory (~160 KB) under A100's 163 KB."""
    return dict(num_warps=8 if block_h * D >= 64 * 128 else 4,
                num_stages=2 if block_h * block_size * D >= 64 * 128 * 128 else 3)


def _dkdv_config(block_size: int, D: int) -> tuple[int, int]:
    """(rows per dk/dv tile, num_warps). The dk, dv accumulators hold 2 x block_size x D fp32
    in registers for the whole program; rows x block_size x D <= 2^18 with 8 warps from
    block_size x D = 4096 is what compiles without spills for sm_90 up to 128 x 128."""
    rows = min(MAX_BLOCK_R, max(MIN_ROWS, 2 ** 18 // (block_size * D)))
    return rows, 8 if block_size * D >= 4096 else 4


@triton.jit
def _token_rows(Counts, Indices, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_im, H_KV, LAYOUT_HEAD_DIV, N_Q,
                G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr):
    """The program's rows (program ids: token, batch x KV head, head chunk): the token's
    position per row, which rows are real heads, q/o tile and lse offsets, the KV head's
    base offset and the token's selection (count, indices)."""
    t = tl.program_id(0)
    # int64 from here: b * stride_qb and h * stride_qh pass 2^31 at long context.
    b = (tl.program_id(1) // H_KV).to(tl.int64)
    hkv = (tl.program_id(1) % H_KV).to(tl.int64)
    g = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    valid = g < G
    # Padding rows alias the group's last head: every load stays in bounds unmasked.
    h = hkv * G + tl.minimum(g, G - 1)
    lh = (hkv * G) // LAYOUT_HEAD_DIV
    offs_d = tl.arange(0, D)
    q_off = b * stride_qb + h[:, None] * stride_qh + t * stride_qn + offs_d[None, :]
    row_off = (b * H_KV * G + h) * N_Q + t
    kv_base = b * stride_kb + hkv * stride_kh
    count = tl.load(Counts + b * stride_cb + lh * stride_ch + t)
    idx_ptr = Indices + b * stride_ib + lh * stride_ih + t * stride_im
    pos = t + tl.zeros([BLOCK_H], tl.int32)
    return pos, valid, q_off, row_off, kv_base, count, idx_ptr


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, Counts, Indices,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_im,
                H_KV, LAYOUT_HEAD_DIV, N_Q, scale_log2, q_start, k_start,
                G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    pos, valid, q_off, row_off, kv_base, count, idx_ptr = _token_rows(
        Counts, Indices, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_cb, stride_ch,
        stride_ib, stride_ih, stride_im, H_KV, LAYOUT_HEAD_DIV, N_Q, G, BLOCK_H, D)
    out, lse = _attend_blocks(tl.load(Q + q_off), K, V, kv_base, idx_ptr, count, pos, stride_kn, scale_log2,
                              q_start, k_start, BLOCK_H, BLOCK, D, CAUSAL, PRECISION)
    tl.store(Out + q_off, out.to(Out.dtype.element_ty), mask=valid[:, None])
    tl.store(Lse + row_off, lse, mask=valid)


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, Lse, Delta, Counts, Indices,
               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
               stride_cb, stride_ch, stride_ib, stride_ih, stride_im,
               H_KV, LAYOUT_HEAD_DIV, N_Q, sm_scale, scale_log2, q_start, k_start,
               G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
               CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    pos, valid, q_off, row_off, kv_base, count, idx_ptr = _token_rows(
        Counts, Indices, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_cb, stride_ch,
        stride_ib, stride_ih, stride_im, H_KV, LAYOUT_HEAD_DIV, N_Q, G, BLOCK_H, D)
    lse, delta = _row_stats(Lse, Delta, row_off)
    dq = _dq_blocks(tl.load(Q + q_off), tl.load(DO + q_off), lse, delta, K, V, kv_base, idx_ptr, count, pos,
                    stride_kn, scale_log2, q_start, k_start, BLOCK_H, BLOCK, D, CAUSAL, PRECISION)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta, ROffsets, RTokens,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 H_KV, LAYOUT_HEAD_DIV, LAYOUT_BATCH_ROWS, N_Q, NUM_K_BLOCKS, sm_scale, scale_log2, q_start, k_start,
                 G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                 CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    kb = tl.program_id(0)
    b = (tl.program_id(1) // H_KV).to(tl.int64)
    hkv = (tl.program_id(1) % H_KV).to(tl.int64)
    # Reverse-index row of (layout batch, layout head, key block); a shared layout has 0 rows per batch.
    lrow = (b * LAYOUT_BATCH_ROWS + (hkv * G) // LAYOUT_HEAD_DIV) * NUM_K_BLOCKS + kb
    start = tl.load(ROffsets + lrow)
    num_pairs = (tl.load(ROffsets + lrow + 1) - start) * G
    offs_k = kb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    kv_off = b * stride_kb + hkv * stride_kh + offs_k[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(K + kv_off)
    v = tl.load(V + kv_off)

    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    for pair0 in range(0, num_pairs, BLOCK_R):
        pair = pair0 + tl.arange(0, BLOCK_R)
        valid = pair < num_pairs
        # Rows past the list read token 0 (in bounds) and are zeroed through p below.
        tok = tl.load(RTokens + start + pair // G, mask=valid, other=0)
        h = hkv * G + pair % G
        q_off = b * stride_qb + h[:, None] * stride_qh + tok[:, None] * stride_qn + offs_d[None, :]
        q = tl.load(Q + q_off)
        do = tl.load(DO + q_off)
        lse, delta = _row_stats(Lse, Delta, (b * H_KV * G + h) * N_Q + tok)
        s = _scores(q, k, tok, offs_k, scale_log2, q_start, k_start, CAUSAL, PRECISION)
        p = tl.where(valid[:, None], tl.exp2(s - lse[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
        ds = p * (_dot(do, tl.trans(v), PRECISION) - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty))


def reverse_index(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Token layout -> CSR over (layout batch, layout head, key block): the tokens of row
    r = (bl * Hl + hl) * Mk + kb are tokens[offsets[r]:offsets[r + 1]], ascending.

    offsets: int32 [Bl * Hl * Mk + 1], tokens: int32 [Bl * Hl * Nq * K]. Device ops only
    (no host sync), memory O(Nq K): never an Nq x Mk tensor."""
    counts, indices = layout.counts, layout.indices
    Bl, Hl, Nq, K = indices.shape
    rows = Bl * Hl * layout.num_k_blocks
    dev = indices.device
    used = torch.arange(K, device=dev, dtype=torch.int32) < counts[..., None]
    first_row = (torch.arange(Bl * Hl, device=dev, dtype=torch.int32) * layout.num_k_blocks).view(Bl, Hl, 1, 1)
    # Unused slots sort after every row; a stable sort keeps each row's tokens ascending.
    key = torch.where(used, first_row + indices, rows).flatten()
    key, order = torch.sort(key, stable=True)
    tokens = (order // K % Nq).to(torch.int32)
    offsets = torch.searchsorted(key, torch.arange(rows + 1, device=dev, dtype=torch.int32), out_int32=True)
    return offsets, tokens


def _token_common(q, k, layout: BlockLayout, block_size: int):
    B, Hq, Nq, D, Hkv, G, div, _, precision = _common(q, k, layout, block_size)
    Bl, Hl, Nl = layout.counts.shape
    if Nl != Nq or layout.num_k_blocks != k.shape[2] // block_size:
        raise ValueError(f"token layout covers {Nl} tokens x {layout.num_k_blocks} key blocks, but q has {Nq} tokens "
                         f"and k has {k.shape[2]} / {block_size} = {k.shape[2] // block_size} key blocks")
    if Hl not in (1, Hkv) or Bl not in (1, q.shape[0]):
        raise ValueError(f"token layout batch x heads must be (1 or {q.shape[0]}) x (1 or Hkv={Hkv}), got {Bl} x {Hl}: "
                         "the selection is shared by a KV group")
    block_h = min(MAX_BLOCK_H, max(MIN_ROWS, triton.next_power_of_2(G)))
    grid = (Nq, B * Hkv, triton.cdiv(G, block_h))
    return Nq, Hkv, G, div, grid, block_h, precision


def forward(q, k, v, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float, q_start: int, k_start: int):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D] (contiguous), layout over Nq tokens
    -> out [B, Hq, Nq, D], lse [B, Hq, Nq] fp32."""
    Nq, Hkv, G, div, grid, block_h, precision = _token_common(q, k, layout, block_size)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    _fwd_kernel[grid](q, k, v, out, lse, layout.counts, layout.indices,
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      *_layout_args(layout), Hkv, div, Nq, sm_scale * LOG2E, q_start, k_start,
                      G=G, BLOCK_H=block_h, BLOCK=block_size, D=q.shape[3], CAUSAL=causal, PRECISION=precision,
                      **_token_config(block_h, block_size, q.shape[3]))
    return out, lse


def backward(do, q, k, v, lse, delta, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float,
             q_start: int, k_start: int):
    """do: [B, Hq, Nq, D], lse and delta = do . o - dlse: [B, Hq, Nq] fp32 -> dq, dk, dv."""
    Nq, Hkv, G, div, grid, block_h, precision = _token_common(q, k, layout, block_size)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    meta = dict(G=G, BLOCK=block_size, D=q.shape[3], CAUSAL=causal, PRECISION=precision)
    _dq_kernel[grid](q, k, v, do, dq, lse, delta, layout.counts, layout.indices, *strides, *_layout_args(layout),
                     Hkv, div, Nq, sm_scale, sm_scale * LOG2E, q_start, k_start, BLOCK_H=block_h,
                     **_token_config(block_h, block_size, q.shape[3]), **meta)
    offsets, tokens = reverse_index(layout)
    Bl, Hl = layout.counts.shape[:2]
    rows, num_warps = _dkdv_config(block_size, q.shape[3])
    _dkdv_kernel[(layout.num_k_blocks, q.shape[0] * Hkv)](
        q, k, v, do, dk, dv, lse, delta, offsets, tokens, *strides, Hkv, div, Hl if Bl > 1 else 0, Nq,
        layout.num_k_blocks, sm_scale, sm_scale * LOG2E, q_start, k_start, BLOCK_R=rows, num_warps=num_warps,
        **meta)
    return dq, dk, dv
