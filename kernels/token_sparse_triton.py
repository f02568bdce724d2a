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
  is expected, not yet measured on a GPU. The key tile (BLOCK_N) runs through
  the token's listed blocks as in block_sparse_triton: a part of a block or
  several blocks.
- dk/dv: one program per (key tile of BLOCK_N keys inside one block, batch x
  KV head) walks a reverse index (key block -> tokens that selected it,
  `reverse_index`, built on device by a stable sort, no host sync, memory
  O(Nq K)) and accumulates dk, dv in registers. Every output tile has exactly
  one writer: no atomics, and the result is bit-for-bit reproducible. Its tile
  rows are consecutive (token, head) pairs of that list, BLOCK_M at a time, so
  a tile may straddle tokens and padding happens once per program, not once
  per token.

Document ids (HAS_DOC, q_doc [B, Nq], k_doc [B, Nk]) skip and mask as in
block_sparse_triton: forward and dq share its key-tile loop (one token's id
against the key tiles' ranges); dk/dv bounds its loop over row tiles the same
way, from the ids of each row tile's first and last token (the list ascends),
so no q / dO of a document its key tile cannot see is loaded.

Tiles, num_warps and num_stages come from launch_config (per arch, head dim,
dtype and G), the function aot_specs() also builds its launches from.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import block_sparse_triton as bst
from .aot import ARCHS, PRESET_BLOCK_SIZES, PRESET_DTYPES, PRESET_MODELS, AOTSpec, signature
from .block_sparse_triton import (BLOCK_SIZES, DOC_POINTERS, DTYPES, HEAD_DIMS, KERNELS, LOG2E, TRITON_DTYPES,
                                  _attend_blocks, _common, _doc_mask, _dot, _dq_blocks, _layout_args,
                                  _meeting_tiles, _row_docs, _row_stats, _scores, doc_args, launch_arch)
from .layout import BlockLayout

__all__ = ["HEAD_DIMS", "forward", "backward", "reverse_index", "launch_config"]

MIN_ROWS = 16      # tl.dot's smallest M
MAX_BLOCK_H = 64   # head rows per forward/dq program; larger groups take several head chunks


def block_h(G: int) -> int:
    """Head rows of a forward/dq program: G padded to a power of two >= MIN_ROWS, capped at MAX_BLOCK_H."""
    return min(MAX_BLOCK_H, max(MIN_ROWS, triton.next_power_of_2(G)))


def launch_config(kernel: str, *, arch: int, dtype: torch.dtype, head_dim: int, block_size: int, group: int) -> dict:
    """Tiles, num_warps, num_stages of kernel "fwd", "dq" or "dkdv" on sm_<arch>: the block
    kernels' (block_sparse_triton.launch_config) with the forward/dq query tile replaced by the
    group's BLOCK_H head rows of one token; dk/dv's BLOCK_M rows are (token, head) pairs."""
    cfg = bst.launch_config(kernel, arch=arch, dtype=dtype, head_dim=head_dim, block_size=block_size)
    if kernel != "dkdv":
        cfg["BLOCK_M"] = block_h(group)
    elif dtype == torch.float32:
        # Measured (benchmarks/results/triton_resources.md): pipelining the gathered fp32 rows spills
        # at every tile size on both archs; unpipelined 16-row tiles do not.
        cfg.update(BLOCK_M=MIN_ROWS, num_stages=1)
    return cfg


@triton.jit
def _token_rows(Counts, Indices, QDoc, KDoc, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb, H_KV, LAYOUT_HEAD_DIV,
                N_Q, G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr):
    """The program's rows (program ids: token, batch x KV head, head chunk): the token's
    position per row, which rows are real heads, q/o tile and lse offsets, the KV head's
    base offset, the token's selection (count, indices) and its batch row's doc ids."""
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
    return t, pos, valid, q_off, row_off, kv_base, count, idx_ptr, QDoc + b * stride_qdb, KDoc + b * stride_kdb


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, Counts, Indices, QDoc, KDoc,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb,
                H_KV, LAYOUT_HEAD_DIV, N_Q, scale_log2, q_start, k_start,
                G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    t, pos, valid, q_off, row_off, kv_base, count, idx_ptr, q_doc, k_doc = _token_rows(
        Counts, Indices, QDoc, KDoc, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_cb, stride_ch,
        stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb, H_KV, LAYOUT_HEAD_DIV, N_Q, G, BLOCK_H, D)
    out, lse = _attend_blocks(tl.load(Q + q_off), K, V, kv_base, idx_ptr, count, pos, t, stride_kn, scale_log2,
                              q_start, k_start, q_doc, k_doc, BLOCK_H, BLOCK, BLOCK_N, D, CAUSAL, HAS_DOC, PRECISION)
    tl.store(Out + q_off, out.to(Out.dtype.element_ty), mask=valid[:, None])
    tl.store(Lse + row_off, lse, mask=valid)


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, Lse, Delta, Counts, Indices, QDoc, KDoc,
               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
               stride_cb, stride_ch, stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb,
               H_KV, LAYOUT_HEAD_DIV, N_Q, sm_scale, scale_log2, q_start, k_start,
               G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
               D: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    t, pos, valid, q_off, row_off, kv_base, count, idx_ptr, q_doc, k_doc = _token_rows(
        Counts, Indices, QDoc, KDoc, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_cb, stride_ch,
        stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb, H_KV, LAYOUT_HEAD_DIV, N_Q, G, BLOCK_H, D)
    lse, delta = _row_stats(Lse, Delta, row_off)
    dq = _dq_blocks(tl.load(Q + q_off), tl.load(DO + q_off), lse, delta, K, V, kv_base, idx_ptr, count, pos, t,
                    stride_kn, scale_log2, q_start, k_start, q_doc, k_doc, BLOCK_H, BLOCK, BLOCK_N, D, CAUSAL,
                    HAS_DOC, PRECISION)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _pair_tile_bounds(tokens, num_pairs, t, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """The first and last token of row tile t (BLOCK_M (token, head) pairs, G per token) of the
    ascending token list at `tokens`."""
    first = tl.load(tokens + (t * BLOCK_M) // G)
    last = tl.load(tokens + (tl.minimum((t + 1) * BLOCK_M, num_pairs) - 1) // G)
    return first, last


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta, ROffsets, RTokens, QDoc, KDoc,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_qdb, stride_kdb,
                 H_KV, LAYOUT_HEAD_DIV, LAYOUT_BATCH_ROWS, N_Q, NUM_K_BLOCKS, sm_scale, scale_log2, q_start, k_start,
                 G: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 D: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    kb = n0 // BLOCK
    b = (tl.program_id(1) // H_KV).to(tl.int64)
    hkv = (tl.program_id(1) % H_KV).to(tl.int64)
    # Reverse-index row of (layout batch, layout head, key block); a shared layout has 0 rows per batch.
    lrow = (b * LAYOUT_BATCH_ROWS + (hkv * G) // LAYOUT_HEAD_DIV) * NUM_K_BLOCKS + kb
    start = tl.load(ROffsets + lrow)
    num_pairs = (tl.load(ROffsets + lrow + 1) - start) * G
    offs_k = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_off = b * stride_kb + hkv * stride_kh + offs_k[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(K + kv_off)
    v = tl.load(V + kv_off)
    q_doc = QDoc + b * stride_qdb
    k_doc = KDoc + b * stride_kdb
    pair_lo = 0
    pair_hi = num_pairs
    if HAS_DOC:
        k_lo, k_hi = _row_docs(k_doc, offs_k)
        begin, end = _meeting_tiles(RTokens + start, num_pairs, tl.cdiv(num_pairs, BLOCK_M), q_doc, k_lo, k_hi, G,
                                    BLOCK_M, _pair_tile_bounds)
        pair_lo = begin * BLOCK_M
        pair_hi = tl.minimum(end * BLOCK_M, num_pairs)

    # fp32: dK/dV sum over every (token, head) pair that selected this key block, possibly all Nq x G
    # of them; rounded to the output dtype once, at the store. (The forward's softmax state and the
    # dq sums are fp32 in block_sparse_triton._attend_blocks / _dq_blocks, shared with this module.)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for pair0 in range(pair_lo, pair_hi, BLOCK_M):
        pair = pair0 + tl.arange(0, BLOCK_M)
        valid = pair < num_pairs
        # Rows past the list read token 0 (in bounds) and are zeroed through p below.
        tok = tl.load(RTokens + start + pair // G, mask=valid, other=0)
        h = hkv * G + pair % G
        q_off = b * stride_qb + h[:, None] * stride_qh + tok[:, None] * stride_qn + offs_d[None, :]
        q = tl.load(Q + q_off)
        do = tl.load(DO + q_off)
        lse, delta = _row_stats(Lse, Delta, (b * H_KV * G + h) * N_Q + tok)
        # The list is ascending: the tile's first token is its earliest.
        first = tl.load(RTokens + start + pair0 // G)
        s = _scores(q, k, tok, offs_k, first, n0 + BLOCK_N - 1, scale_log2, q_start, k_start, CAUSAL, PRECISION)
        if HAS_DOC:
            last = tl.load(RTokens + start + (tl.minimum(pair0 + BLOCK_M, num_pairs) - 1) // G)
            s = _doc_mask(s, tl.load(q_doc + first), tl.load(q_doc + last), k_lo, k_hi, q_doc + tok, k_doc + offs_k)
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
    B, Hq, Nq, D, Hkv, G, div, precision = _common(q, k, layout)
    Bl, Hl, Nl = layout.counts.shape
    if Nl != Nq or layout.num_k_blocks != k.shape[2] // block_size:
        raise ValueError(f"token layout covers {Nl} tokens x {layout.num_k_blocks} key blocks, but q has {Nq} tokens "
                         f"and k has {k.shape[2]} / {block_size} = {k.shape[2] // block_size} key blocks")
    if Hl not in (1, Hkv) or Bl not in (1, q.shape[0]):
        raise ValueError(f"token layout batch x heads must be (1 or {q.shape[0]}) x (1 or Hkv={Hkv}), got {Bl} x {Hl}: "
                         "the selection is shared by a KV group")
    return Nq, Hkv, G, div, precision


def _meta(kernel, q, block_size, G, causal, prec, has_doc):
    cfg = launch_config(kernel, arch=launch_arch(q), dtype=q.dtype, head_dim=q.shape[3], block_size=block_size,
                        group=G)
    if kernel != "dkdv":
        cfg["BLOCK_H"] = cfg.pop("BLOCK_M")
    return dict(G=G, BLOCK=block_size, D=q.shape[3], CAUSAL=causal, HAS_DOC=has_doc, PRECISION=prec, **cfg)


def forward(q, k, v, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float, q_start: int, k_start: int,
            q_doc=None, k_doc=None):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D] (contiguous), layout over Nq tokens, doc ids q_doc [B, Nq],
    k_doc [B, Nk] int32 contiguous or None -> out [B, Hq, Nq, D], lse [B, Hq, Nq] fp32."""
    Nq, Hkv, G, div, prec = _token_common(q, k, layout, block_size)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    docs, doc_strides = doc_args(q_doc, k_doc, layout.counts)
    meta = _meta("fwd", q, block_size, G, causal, prec, q_doc is not None)
    _fwd_kernel[(Nq, q.shape[0] * Hkv, triton.cdiv(G, meta["BLOCK_H"]))](
        q, k, v, out, lse, layout.counts, layout.indices, *docs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        *_layout_args(layout), *doc_strides, Hkv, div, Nq, sm_scale * LOG2E, q_start, k_start, **meta)
    return out, lse


def backward(do, q, k, v, lse, delta, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float,
             q_start: int, k_start: int, q_doc=None, k_doc=None):
    """do: [B, Hq, Nq, D], lse and delta = do . o - dlse: [B, Hq, Nq] fp32, doc ids as in forward -> dq, dk, dv."""
    Nq, Hkv, G, div, prec = _token_common(q, k, layout, block_size)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    docs, doc_strides = doc_args(q_doc, k_doc, layout.counts)
    meta = _meta("dq", q, block_size, G, causal, prec, q_doc is not None)
    _dq_kernel[(Nq, q.shape[0] * Hkv, triton.cdiv(G, meta["BLOCK_H"]))](
        q, k, v, do, dq, lse, delta, layout.counts, layout.indices, *docs, *strides, *_layout_args(layout),
        *doc_strides, Hkv, div, Nq, sm_scale, sm_scale * LOG2E, q_start, k_start, **meta)
    offsets, tokens = reverse_index(layout)
    Bl, Hl = layout.counts.shape[:2]
    meta = _meta("dkdv", q, block_size, G, causal, prec, q_doc is not None)
    _dkdv_kernel[(k.shape[2] // meta["BLOCK_N"], q.shape[0] * Hkv)](
        q, k, v, do, dk, dv, lse, delta, offsets, tokens, *docs, *strides, *doc_strides, Hkv, div,
        Hl if Bl > 1 else 0, Nq, layout.num_k_blocks, sm_scale, sm_scale * LOG2E, q_start, k_start, **meta)
    return dq, dk, dv


_FNS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}
_POINTERS = {"fwd": ("Q", "K", "V", "Out"), "dq": ("Q", "K", "V", "DO", "DQ"), "dkdv": ("Q", "K", "V", "DO", "DK", "DV")}
_ALIGNED = bst._ALIGNED
# GQA ratios whose compiled code differs: 1 (no sharing), the presets' 2, 3 (not a power of
# two) and 4, and the head-row tiles of 32 and 64 rows (BLOCK_H) beyond 16.
GROUPS = (1, 2, 3, 4, 32, 64)


def aot_spec(kernel: str, *, arch: int, dtype: torch.dtype, head_dim: int, block_size: int, group: int,
             causal: bool, default: bool, has_doc: bool = False) -> AOTSpec:
    """The launch forward/backward make on sm_<arch> for these settings (group = Hq / Hkv; has_doc:
    with document ids), as an AOTSpec."""
    cfg = launch_config(kernel, arch=arch, dtype=dtype, head_dim=head_dim, block_size=block_size, group=group)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    if kernel != "dkdv":
        cfg["BLOCK_H"] = cfg.pop("BLOCK_M")
    meta = dict(G=group, BLOCK=block_size, D=head_dim, CAUSAL=causal, HAS_DOC=has_doc,
                PRECISION=bst.precision(dtype, False), **cfg)
    fn = _FNS[kernel]
    pointers = {name: TRITON_DTYPES[dtype] for name in _POINTERS[kernel]}
    pointers.update({name: "fp32" for name in ("Lse", "Delta")},
                    **{name: "i32" for name in ("Counts", "Indices", "ROffsets", "RTokens", *DOC_POINTERS)})
    config = dict(arch=arch, dtype=TRITON_DTYPES[dtype], head_dim=head_dim, block_size=block_size, causal=causal,
                  layout="token", group=group, doc=has_doc, **cfg)
    return AOTSpec(f"token_sparse_{kernel}", fn, signature(fn, meta, pointers, ("scale_log2", "sm_scale")), meta,
                   num_warps, num_stages, config, default, _ALIGNED)


def aot_specs() -> list[AOTSpec]:
    """The launches of the 3 kernels x ARCHS: the presets' (dtype, (head dim, G), block size), causal
    as InfLLM-V2 always is (default); around bf16 / head dim 64 / G 4 / block 64 / causal, every other
    allowed value of one setting at a time (dtype, head dim, block size, G in GROUPS, causal); head
    dim 128 (Llama-scale models) at every block size in bf16 and fp32. All without doc ids; then the
    presets' launches again with them (HAS_DOC, packed documents), not flagged default: fp32 dK/dV
    on sm_80 spills 16 bytes at head dim 64, G 3, block 64."""
    presets = [(dtype, d, bs, g, True) for dtype, (d, g), bs in
               itertools.product(PRESET_DTYPES, PRESET_MODELS, PRESET_BLOCK_SIZES)]
    configs = presets + [(dtype, 64, 64, 4, True) for dtype in DTYPES]
    configs += [(torch.bfloat16, d, 64, 4, True) for d in HEAD_DIMS]
    configs += [(torch.bfloat16, 64, bs, 4, True) for bs in BLOCK_SIZES]
    configs += [(torch.bfloat16, 64, 64, g, True) for g in GROUPS] + [(torch.bfloat16, 64, 64, 4, False)]
    configs += [(dtype, 128, bs, 4, True) for dtype, bs in itertools.product(PRESET_DTYPES, BLOCK_SIZES)]
    configs = [(*c, False) for c in dict.fromkeys(configs)] + [(*c, True) for c in presets]
    return [aot_spec(kernel, arch=arch, dtype=dtype, head_dim=d, block_size=bs, group=g, causal=causal,
                     has_doc=has_doc, default=not has_doc and causal and dtype in PRESET_DTYPES
                     and (d, g) in PRESET_MODELS and bs in PRESET_BLOCK_SIZES)
            for kernel, arch in itertools.product(KERNELS, ARCHS) for dtype, d, bs, g, causal, has_doc in configs]
