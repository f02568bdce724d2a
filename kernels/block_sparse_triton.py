"""Triton block-sparse flash attention (FlashAttention-2 recurrence), forward
and backward, visiting only the active blocks of a BlockLayout.

Same contract as block_sparse_ref (the oracle; equations in block_sparse_cpu). Three kernels:

- forward, one program per (query tile, batch x query head): loops over the
  key tiles of its query block's listed key blocks with the online softmax
      m' = max(m, rowmax s), l' = l e^(m - m') + rowsum e^(s - m'), acc' = acc e^(m - m') + e^(s - m') v
  (in base 2), and stores o = acc / l and lse = m + log l.
- dq, one program per (query tile, batch x query head): same loop, recomputes
  p = exp(s - lse) and accumulates dq = sm_scale sum ds k.
- dk/dv, one program per (key tile, batch x KV head): walks the reverse index
  (key block -> query blocks, `layout.transposed`, cached on the layout) for
  each of the G query heads of its GQA group and accumulates dk, dv in
  registers. Every output tile has exactly one writer, so there are no
  atomics and the backward is deterministic.

Tiles are decoupled from the layout's block size (launch_config, per arch,
head dim and dtype): the program's own tile (BLOCK_M query rows, or BLOCK_N
keys for dk/dv) divides one layout block, since a program serves one layout
row; the tile it loops over runs through the concatenation of the listed
blocks, so it may be a part of a block or span several (a gather of whole
blocks; past the list's end it reads block 0 and masks it). The causal mask
is built only on tiles that cross the diagonal.

Document ids (HAS_DOC; q_doc [B, Nq], k_doc [B, Nk] int32, non-decreasing along
a row): a tile's ids lie between those of its first and last position, and
two tiles can share a document only if those ranges meet. The looped tiles
ascend, so the ones that can meet the program's own tile are one run of its
list: two binary searches over the list (log2 of its length in scalar loads)
bound the loop to it, and no K/V (or Q/dO) tile of another document is ever
loaded, while the loop body keeps its loads unconditional (so Triton still
pipelines them). A tile pair whose ids are all one document needs no token
mask; any other masks q_doc_i != k_doc_j to -inf. HAS_DOC=False (no doc ids)
compiles none of it: today's kernels.

An empty row keeps m = -inf; exponents use m_safe = 0 there so exp2(-inf) = 0
replaces the NaN of -inf - -inf, giving o = 0, lse = -inf and zero gradients.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from .aot import ARCHS, PRESET_BLOCK_SIZES, PRESET_DTYPES, PRESET_MODELS, AOTSpec, device_arch, signature
from .layout import BlockLayout

HEAD_DIMS = (32, 64, 128)
BLOCK_SIZES = (16, 32, 64, 128)  # layout block sizes with launch configs (block_sparse_attention's block_size)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.0 / math.log(2.0)
TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kernel, arch, 16-bit or fp32, head dim), chosen by
# compiling candidates ahead of time (kernels/aot.py): the largest tiles that compile without spills
# and within the arch's shared memory (benchmarks/results/triton_resources.md has what they use).
# fp32 runs IEEE dots on CUDA cores, whose operands live in registers: smaller tiles.
_TILES = {
    ("fwd", 80, 16): {32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 2)},
    ("fwd", 90, 16): {32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 3)},
    ("dq", 80, 16): {32: (64, 64, 4, 3), 64: (64, 32, 4, 3), 128: (64, 32, 4, 3)},
    ("dq", 90, 16): {32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 3)},
    ("dkdv", 80, 16): {32: (64, 64, 4, 3), 64: (32, 32, 4, 3), 128: (32, 64, 8, 2)},
    ("dkdv", 90, 16): {32: (64, 64, 4, 3), 64: (64, 64, 8, 3), 128: (64, 64, 8, 3)},
    ("fwd", 80, 32): {32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 4, 2)},
    ("fwd", 90, 32): {32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 4, 2)},
    ("dq", 80, 32): {32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 4, 2)},
    ("dq", 90, 32): {32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 4, 2)},
    ("dkdv", 80, 32): {32: (32, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 8, 2)},
    ("dkdv", 90, 32): {32: (32, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 8, 2)},
}
KERNELS = ("fwd", "dq", "dkdv")


def launch_config(kernel: str, *, arch: int, dtype: torch.dtype, head_dim: int, block_size: int) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of kernel "fwd", "dq" or "dkdv" on sm_<arch>.
    The program's own tile (BLOCK_M for fwd/dq, BLOCK_N for dk/dv) is capped at the layout
    block; the looped tile is free (a power of two: a part of a block or several blocks)."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} has no Triton launch configuration (supported: {HEAD_DIMS}); "
                         "use impl='torch'")
    bits = 32 if dtype == torch.float32 else 16
    block_m, block_n, num_warps, num_stages = _TILES[(kernel, arch, bits)][head_dim]
    own = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    if cfg[own] > block_size:
        # A smaller own tile halves (or quarters) the per-warp work of 8 warps: 4 suffice.
        cfg[own], cfg["num_warps"] = block_size, 4
    return cfg


def precision(dtype: torch.dtype, interpreted: bool) -> str:
    """tl.dot input precision: IEEE for fp32 (exact), native for 16-bit; "interpret" under the
    Triton interpreter for bf16, which numpy multiplies as raw bits (see _dot)."""
    if interpreted and dtype == torch.bfloat16:
        return "interpret"
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_arch(q: torch.Tensor) -> int:
    """The arch whose launch configs q's kernels use; the interpreter (CPU tensors) takes sm_90's."""
    return device_arch(q.device) if q.is_cuda else ARCHS[-1]


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
def _tile_bounds(idx_ptr, count, t, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """The first and last real position of tile t of TILE positions in the concatenation of the
    `count` blocks (BLOCK positions each, ascending) listed at idx_ptr."""
    if TILE <= BLOCK:
        first = tl.load(idx_ptr + t // (BLOCK // TILE)) * BLOCK + (t % (BLOCK // TILE)) * TILE
        last = first + TILE - 1
    else:
        slot = t * (TILE // BLOCK)
        first = tl.load(idx_ptr + slot) * BLOCK
        last = tl.load(idx_ptr + tl.minimum(slot + TILE // BLOCK, count) - 1) * BLOCK + BLOCK - 1
    return first, last


@triton.jit
def _listed_tile(idx_ptr, count, t, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """Tile t of TILE positions in the concatenation of the `count` blocks (BLOCK positions each,
    ascending) listed at idx_ptr: the positions, which of them are real (a tile spanning several
    blocks may run past the list; those read block 0), and the first and last real position."""
    first, last = _tile_bounds(idx_ptr, count, t, BLOCK, TILE)
    if TILE <= BLOCK:
        offs = first + tl.arange(0, TILE)
        real = tl.full([TILE], 1, tl.int1)
    else:
        pos = t * TILE + tl.arange(0, TILE)
        real = pos // BLOCK < count
        offs = tl.load(idx_ptr + pos // BLOCK, mask=real, other=0) * BLOCK + pos % BLOCK
    return offs, real, first, last


@triton.jit
def _first_tile(ptr, count, n, Doc, key, AFTER: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                BOUNDS: tl.constexpr):
    """The first of n tiles whose last doc id is >= key (AFTER=False) or whose first id is > key
    (AFTER=True), n if none; BOUNDS(ptr, count, t, A, B) gives tile t's first and last position.
    Both ids ascend with the tile: a binary search."""
    lo = n * 0
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        first, last = BOUNDS(ptr, count, mid, A, B)
        if AFTER:
            found = tl.load(Doc + first) > key
        else:
            found = tl.load(Doc + last) >= key
        lo = tl.where(found, lo, mid + 1)
        hi = tl.where(found, mid, hi)
    return lo


@triton.jit
def _meeting_tiles(ptr, count, n, Doc, lo, hi, A: tl.constexpr, B: tl.constexpr, BOUNDS: tl.constexpr):
    """[begin, end): those of the n looped tiles (first and last positions from BOUNDS, as in
    _first_tile) whose doc ids (at Doc) can meet the other side's ids [lo, hi]. A tile's ids span
    [Doc[first], Doc[last]] and both ends ascend with the tile (the tiles run through ascending
    positions, and ids ascend along the row), so those tiles are one run, found by two binary
    searches; the loop visits only it, and no tile outside it is loaded."""
    begin = _first_tile(ptr, count, n, Doc, lo, False, A, B, BOUNDS)
    end = _first_tile(ptr, count, n, Doc, hi, True, A, B, BOUNDS)
    return begin, tl.maximum(begin, end)


@triton.jit
def _row_docs(Doc, rows):
    """The doc-id range [lo, hi] of the positions `rows`."""
    ids = tl.load(Doc + rows)
    return tl.min(ids, 0), tl.max(ids, 0)


@triton.jit
def _doc_mask(s, q_lo, q_hi, k_lo, k_hi, q_doc_ptrs, k_doc_ptrs):
    """s with -inf where the query's document (ids at q_doc_ptrs, one per row) differs from the
    key's (k_doc_ptrs, one per column); read and applied only when the tiles' ids [q_lo, q_hi] and
    [k_lo, k_hi] are not all one document."""
    if (q_lo != q_hi) | (k_lo != k_hi) | (q_lo != k_lo):
        s = tl.where(tl.load(q_doc_ptrs)[:, None] == tl.load(k_doc_ptrs)[None, :], s, float("-inf"))
    return s


@triton.jit
def _scores(q, k, rows, cols, row_lo, col_hi, scale_log2, q_start, k_start, CAUSAL: tl.constexpr,
            PRECISION: tl.constexpr):
    """s = q k^T scale in base 2, -inf above the diagonal of global positions when CAUSAL; the
    mask is built only when the tile crosses it (its last key after its first query)."""
    s = _dot(q, tl.trans(k), PRECISION) * scale_log2
    if CAUSAL:
        if k_start + col_hi > q_start + row_lo:
            s = tl.where((q_start + rows)[:, None] >= (k_start + cols)[None, :], s, float("-inf"))
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
def _attend_blocks(q, K, V, kv_base, idx_ptr, count, rows, row_lo, stride_kn, scale_log2, q_start, k_start,
                   QDoc, KDoc, ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    """(o, lse) of the q rows (query positions `rows`, the first of them row_lo) over the key
    tiles of the `count` blocks listed at idx_ptr (with doc ids QDoc, KDoc of this batch row: those
    that can meet the rows' documents): the forward loop block and token kernels share."""
    offs_d = tl.arange(0, D)
    # fp32 whatever the input dtype: m, l and acc are rescaled by alpha and summed over every key
    # tile of the row (the softmax merge); in bf16 each rescale-and-add would round to 8 bits, an
    # error growing with the number of tiles. Only p is cast to V's dtype for the dot (tensor
    # cores), whose products tl.dot sums in fp32.
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    begin = 0
    end = tl.cdiv(count * BLOCK, BLOCK_N)
    if HAS_DOC:
        q_lo, q_hi = _row_docs(QDoc, rows)
        begin, end = _meeting_tiles(idx_ptr, count, end, KDoc, q_lo, q_hi, BLOCK, BLOCK_N, _tile_bounds)
    for t in range(begin, end):
        offs_k, real, first, last = _listed_tile(idx_ptr, count, t, BLOCK, BLOCK_N)
        kv_off = kv_base + offs_k[:, None] * stride_kn + offs_d[None, :]
        s = _scores(q, tl.load(K + kv_off), rows, offs_k, row_lo, last, scale_log2, q_start, k_start, CAUSAL,
                    PRECISION)
        if BLOCK_N > BLOCK:
            s = tl.where(real[None, :], s, float("-inf"))
        if HAS_DOC:
            s = _doc_mask(s, q_lo, q_hi, tl.load(KDoc + first), tl.load(KDoc + last), QDoc + rows, KDoc + offs_k)
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, tl.load(V + kv_off), PRECISION)
    return _softmax_result(m_i, l_i, acc)


@triton.jit
def _dq_blocks(q, do, lse, delta, K, V, kv_base, idx_ptr, count, rows, row_lo, stride_kn, scale_log2, q_start,
               k_start, QDoc, KDoc, ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    """sum_j ds_ij k_j (dq before sm_scale) of the q rows over the same key tiles,
    from their saved lse (base 2) and delta: the dq loop block and token kernels share."""
    offs_d = tl.arange(0, D)
    dq = tl.zeros([ROWS, D], tl.float32)  # fp32: summed over every key tile of the row; rounded once at the store
    begin = 0
    end = tl.cdiv(count * BLOCK, BLOCK_N)
    if HAS_DOC:
        q_lo, q_hi = _row_docs(QDoc, rows)
        begin, end = _meeting_tiles(idx_ptr, count, end, KDoc, q_lo, q_hi, BLOCK, BLOCK_N, _tile_bounds)
    for t in range(begin, end):
        offs_k, real, first, last = _listed_tile(idx_ptr, count, t, BLOCK, BLOCK_N)
        kv_off = kv_base + offs_k[:, None] * stride_kn + offs_d[None, :]
        k = tl.load(K + kv_off)
        v = tl.load(V + kv_off)
        s = _scores(q, k, rows, offs_k, row_lo, last, scale_log2, q_start, k_start, CAUSAL, PRECISION)
        if HAS_DOC:
            s = _doc_mask(s, q_lo, q_hi, tl.load(KDoc + first), tl.load(KDoc + last), QDoc + rows, KDoc + offs_k)
        p = tl.exp2(s - lse[:, None])
        if BLOCK_N > BLOCK:
            p = tl.where(real[None, :], p, 0.0)
        ds = p * (_dot(do, tl.trans(v), PRECISION) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def _row_stats(Lse, Delta, row_off):
    """Saved lse (base 2; an empty row's -inf becomes 0 so that p = 0, not NaN) and delta of the rows."""
    lse = tl.load(Lse + row_off) * 1.4426950408889634
    return tl.where(lse == float("-inf"), 0.0, lse), tl.load(Delta + row_off)


@triton.jit
def _query_tile(Counts, Indices, QDoc, KDoc, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb, H, G, LAYOUT_HEAD_DIV,
                BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """The program's query tile (program ids: query tile, batch x query head): its first row,
    row offsets, q/o tile offsets, its KV head's base offset, its query block's layout row, and
    its batch row's query and key doc ids."""
    m0 = tl.program_id(0) * BLOCK_M
    qb = m0 // BLOCK
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    lh = h // LAYOUT_HEAD_DIV
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    kv_base = b * stride_kb + (h // G) * stride_kh
    count = tl.load(Counts + b * stride_cb + lh * stride_ch + qb)
    idx_ptr = Indices + b * stride_ib + lh * stride_ih + qb * stride_im
    return m0, offs_m, q_off, kv_base, count, idx_ptr, QDoc + b * stride_qdb, KDoc + b * stride_kdb


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, Counts, Indices, QDoc, KDoc,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb,
                H, G, LAYOUT_HEAD_DIV, N_Q, scale_log2, q_start, k_start,
                BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    m0, offs_m, q_off, kv_base, count, idx_ptr, q_doc, k_doc = _query_tile(
        Counts, Indices, QDoc, KDoc, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_cb, stride_ch,
        stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb, H, G, LAYOUT_HEAD_DIV, BLOCK, BLOCK_M, D)
    out, lse = _attend_blocks(tl.load(Q + q_off), K, V, kv_base, idx_ptr, count, offs_m, m0, stride_kn, scale_log2,
                              q_start, k_start, q_doc, k_doc, BLOCK_M, BLOCK, BLOCK_N, D, CAUSAL, HAS_DOC, PRECISION)
    tl.store(Out + q_off, out.to(Out.dtype.element_ty))
    tl.store(Lse + tl.program_id(1) * N_Q + offs_m, lse)


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, Lse, Delta, Counts, Indices, QDoc, KDoc,
               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
               stride_cb, stride_ch, stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb,
               H, G, LAYOUT_HEAD_DIV, N_Q, sm_scale, scale_log2, q_start, k_start,
               BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    m0, offs_m, q_off, kv_base, count, idx_ptr, q_doc, k_doc = _query_tile(
        Counts, Indices, QDoc, KDoc, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_cb, stride_ch,
        stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb, H, G, LAYOUT_HEAD_DIV, BLOCK, BLOCK_M, D)
    lse, delta = _row_stats(Lse, Delta, tl.program_id(1) * N_Q + offs_m)
    dq = _dq_blocks(tl.load(Q + q_off), tl.load(DO + q_off), lse, delta, K, V, kv_base, idx_ptr, count, offs_m, m0,
                    stride_kn, scale_log2, q_start, k_start, q_doc, k_doc, BLOCK_M, BLOCK, BLOCK_N, D, CAUSAL,
                    HAS_DOC, PRECISION)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty))


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta, RCounts, RIndices, QDoc, KDoc,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_cb, stride_ch, stride_ib, stride_ih, stride_im, stride_qdb, stride_kdb,
                 H_KV, G, LAYOUT_HEAD_DIV, N_Q, sm_scale, scale_log2, q_start, k_start,
                 BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    kb = n0 // BLOCK
    b = tl.program_id(1) // H_KV
    hkv = tl.program_id(1) % H_KV
    offs_k = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_off = b * stride_kb + hkv * stride_kh + offs_k[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(K + kv_off)
    v = tl.load(V + kv_off)
    q_doc = QDoc + b * stride_qdb
    k_doc = KDoc + b * stride_kdb
    if HAS_DOC:
        k_lo, k_hi = _row_docs(k_doc, offs_k)

    # fp32: dK/dV sum over the G query heads and every query tile that reads this key tile
    # (possibly all Nq / BLOCK_M of them); rounded to the output dtype once, at the store.
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for g in range(G):
        h = hkv * G + g
        lh = h // LAYOUT_HEAD_DIV
        count = tl.load(RCounts + b * stride_cb + lh * stride_ch + kb)
        idx_ptr = RIndices + b * stride_ib + lh * stride_ih + kb * stride_im
        q_base = b * stride_qb + h * stride_qh
        begin = 0
        end = tl.cdiv(count * BLOCK, BLOCK_M)
        if HAS_DOC:
            begin, end = _meeting_tiles(idx_ptr, count, end, q_doc, k_lo, k_hi, BLOCK, BLOCK_M, _tile_bounds)
        for t in range(begin, end):
            offs_m, real, first, last = _listed_tile(idx_ptr, count, t, BLOCK, BLOCK_M)
            q_off = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
            q = tl.load(Q + q_off)
            do = tl.load(DO + q_off)
            lse, delta = _row_stats(Lse, Delta, (b * H_KV * G + h) * N_Q + offs_m)
            s = _scores(q, k, offs_m, offs_k, first, n0 + BLOCK_N - 1, scale_log2, q_start, k_start, CAUSAL,
                        PRECISION)
            if HAS_DOC:
                s = _doc_mask(s, tl.load(q_doc + first), tl.load(q_doc + last), k_lo, k_hi, q_doc + offs_m,
                              k_doc + offs_k)
            p = tl.exp2(s - lse[:, None])
            if BLOCK_M > BLOCK:
                p = tl.where(real[:, None], p, 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
            ds = p * (_dot(do, tl.trans(v), PRECISION) - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty))


def _layout_args(layout: BlockLayout):
    """Strides of counts/indices; batch stride 0 broadcasts a shared layout."""
    counts, indices = layout.counts, layout.indices
    shared = counts.shape[0] == 1
    return (0 if shared else counts.stride(0), counts.stride(1),
            0 if shared else indices.stride(0), indices.stride(1), indices.stride(2))


def _common(q, k, layout: BlockLayout):
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    Hl = layout.counts.shape[1]
    # Layout head of query head h is h // div: Hl == Hq -> h, Hl == Hkv -> h // G, Hl == 1 -> 0.
    div = 1 if Hl == Hq else (G if Hl == Hkv else Hq)
    return B, Hq, Nq, D, Hkv, G, div, precision(q.dtype, not q.is_cuda)


def doc_args(q_doc, k_doc, placeholder: torch.Tensor) -> tuple:
    """(q doc pointer, k doc pointer) and their batch strides; without doc ids an int32
    placeholder the kernel never reads (HAS_DOC=False) and strides 0."""
    if q_doc is None:
        return (placeholder, placeholder), (0, 0)
    return (q_doc, k_doc), (q_doc.stride(0), k_doc.stride(0))


def _meta(kernel, q, block_size, causal, prec, has_doc):
    cfg = launch_config(kernel, arch=launch_arch(q), dtype=q.dtype, head_dim=q.shape[3], block_size=block_size)
    return dict(BLOCK=block_size, D=q.shape[3], CAUSAL=causal, HAS_DOC=has_doc, PRECISION=prec, **cfg)


def forward(q, k, v, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float, q_start: int, k_start: int,
            q_doc=None, k_doc=None):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D] (contiguous), doc ids q_doc [B, Nq], k_doc [B, Nk] int32
    contiguous or None -> out [B, Hq, Nq, D], lse [B, Hq, Nq] fp32."""
    B, Hq, Nq, D, Hkv, G, div, prec = _common(q, k, layout)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    docs, doc_strides = doc_args(q_doc, k_doc, layout.counts)
    meta = _meta("fwd", q, block_size, causal, prec, q_doc is not None)
    _fwd_kernel[(Nq // meta["BLOCK_M"], B * Hq)](
        q, k, v, out, lse, layout.counts, layout.indices, *docs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        *_layout_args(layout), *doc_strides, Hq, G, div, Nq, sm_scale * LOG2E, q_start, k_start, **meta)
    return out, lse


def backward(do, q, k, v, lse, delta, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float,
             q_start: int, k_start: int, q_doc=None, k_doc=None):
    """do: [B, Hq, Nq, D], lse and delta = do . o - dlse: [B, Hq, Nq] fp32, doc ids as in forward -> dq, dk, dv."""
    B, Hq, Nq, D, Hkv, G, div, prec = _common(q, k, layout)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    docs, doc_strides = doc_args(q_doc, k_doc, layout.counts)
    meta = _meta("dq", q, block_size, causal, prec, q_doc is not None)
    _dq_kernel[(Nq // meta["BLOCK_M"], B * Hq)](
        q, k, v, do, dq, lse, delta, layout.counts, layout.indices, *docs, *strides, *_layout_args(layout),
        *doc_strides, Hq, G, div, Nq, sm_scale, sm_scale * LOG2E, q_start, k_start, **meta)
    rev = layout.transposed
    meta = _meta("dkdv", q, block_size, causal, prec, q_doc is not None)
    _dkdv_kernel[(k.shape[2] // meta["BLOCK_N"], B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, rev.counts, rev.indices, *docs, *strides, *_layout_args(rev),
        *doc_strides, Hkv, G, div, Nq, sm_scale, sm_scale * LOG2E, q_start, k_start, **meta)
    return dq, dk, dv


_FNS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}
_POINTERS = {"fwd": ("Q", "K", "V", "Out"), "dq": ("Q", "K", "V", "DO", "DQ"), "dkdv": ("Q", "K", "V", "DO", "DK", "DV")}
# Doc-id strides are Nq and Nk, multiples of the block (>= 16), or 0 without doc ids.
_ALIGNED = ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn", "stride_qdb", "stride_kdb")
DOC_POINTERS = ("QDoc", "KDoc")


def aot_spec(kernel: str, *, arch: int, dtype: torch.dtype, head_dim: int, block_size: int, causal: bool,
             default: bool, has_doc: bool = False) -> AOTSpec:
    """The launch forward/backward make on sm_<arch> for these settings (has_doc: with document
    ids), as an AOTSpec."""
    meta = dict(BLOCK=block_size, D=head_dim, CAUSAL=causal, HAS_DOC=has_doc, PRECISION=precision(dtype, False),
                **launch_config(kernel, arch=arch, dtype=dtype, head_dim=head_dim, block_size=block_size))
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    fn = _FNS[kernel]
    pointers = {name: TRITON_DTYPES[dtype] for name in _POINTERS[kernel]}
    pointers.update({name: "fp32" for name in ("Lse", "Delta")},
                    **{name: "i32" for name in ("Counts", "Indices", "RCounts", "RIndices", *DOC_POINTERS)})
    config = dict(arch=arch, dtype=TRITON_DTYPES[dtype], head_dim=head_dim, block_size=block_size, causal=causal,
                  layout="block", BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"], doc=has_doc)
    return AOTSpec(f"block_sparse_{kernel}", fn, signature(fn, meta, pointers, ("scale_log2", "sm_scale")), meta,
                   num_warps, num_stages, config, default, _ALIGNED)


def aot_specs() -> list[AOTSpec]:
    """The launches of the 3 kernels x ARCHS: the presets' (dtype, head dim, block size), causal
    (default); around bf16 / head dim 64 / block 64 / causal, every other allowed value of one
    setting at a time (dtype, head dim, block size, causal); head dim 128 (Llama-scale models)
    at every block size in bf16 and fp32. All without doc ids; then the presets' launches again with
    them (HAS_DOC, packed documents), not flagged default (the token kernels' are not spill-free)."""
    preset_dims = sorted({d for d, _ in PRESET_MODELS})
    presets = [(dtype, d, bs, True)
               for dtype, d, bs in itertools.product(PRESET_DTYPES, preset_dims, PRESET_BLOCK_SIZES)]
    configs = presets + [(dtype, 64, 64, True) for dtype in DTYPES] + [(torch.bfloat16, d, 64, True) for d in HEAD_DIMS]
    configs += [(torch.bfloat16, 64, bs, True) for bs in BLOCK_SIZES] + [(torch.bfloat16, 64, 64, False)]
    configs += [(dtype, 128, bs, True) for dtype, bs in itertools.product(PRESET_DTYPES, BLOCK_SIZES)]
    configs = [(*c, False) for c in dict.fromkeys(configs)] + [(*c, True) for c in presets]
    return [aot_spec(kernel, arch=arch, dtype=dtype, head_dim=d, block_size=bs, causal=causal, has_doc=has_doc,
                     default=not has_doc and causal and dtype in PRESET_DTYPES and d in preset_dims
                     and bs in PRESET_BLOCK_SIZES)
            for kernel, arch in itertools.product(KERNELS, ARCHS) for dtype, d, bs, causal, has_doc in configs]
