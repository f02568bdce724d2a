"""Triton block scores for InfLLM-V2 selection: the equations of infllm_v2_ref
(its `block_scores_torch` is the oracle), without ever holding a query x
compressed-key matrix beyond one tile.

Two kernels:

    _lse_kernel    one program per (batch, query head, query tile): online
                   log-sum-exp of q . K_c / sqrt(D) over the visible chunks.
    _score_kernel  one program per (batch, KV group, query tile): for each
                   tile of key blocks, gathers the S + P chunks each block
                   pools, sums exp(s - lse) over the group's query heads,
                   takes the max over the chunks (max pooling) and stores
                   per-token scores [tile, blocks].

The lse kernel also serves the coarse estimate: run over K_c2 with the coarse
window and stride (infllm_v2_ref, `lse="coarse"`).

Packed documents (HAS_DOC): a chunk is visible to a query only if its first
token's document (infllm_v2_ref.chunk_docs, KCDOC) is the query's (QDOC):
one int32 compare per (query, chunk) in both kernels.

Chunks shared by neighbouring blocks (P of every S + P) are scored twice;
that keeps pooling a plain per-block reduction. Both kernels stop at the last
chunk / block visible to the tile's last query.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from .aot import PRESET_DTYPES, PRESET_MODELS, AOTSpec, signature
from .block_sparse_triton import HEAD_DIMS, TRITON_DTYPES, launch_arch
from .infllm_v2_ref import COARSE, LSE_MODES, pool_geometry

BLOCK_Q = 64
BLOCK_C = 64
BLOCK_B = 8


@triton.jit
def _load_q(Q, base, rows, N, D, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    return tl.load(Q + base + rows[:, None] * D + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < D),
                   other=0.0).to(tl.float32)


@triton.jit
def _lse_kernel(Q, KC, LSE, QDOC, KCDOC, q_start, N, NC, HQ, HKV, D, sm_scale, KERNEL_SIZE: tl.constexpr,
                KERNEL_STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_DOC: tl.constexpr):
    bh = tl.program_id(1)
    kv = (bh // HQ) * HKV + (bh % HQ) // (HQ // HKV)
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pos = q_start + rows
    q = _load_q(Q, bh * N * D, rows, N, D, BLOCK_D)
    if HAS_DOC:
        qdoc = tl.load(QDOC + (bh // HQ) * N + rows, mask=rows < N, other=-1)
    cols_d = tl.arange(0, BLOCK_D)
    last = q_start + tl.program_id(0) * BLOCK_Q + BLOCK_Q - 1
    hi = tl.minimum(NC, tl.where(last >= KERNEL_SIZE - 1, (last - KERNEL_SIZE + 1) // KERNEL_STRIDE + 1, 0))
    # fp32 online log-sum-exp (q is loaded as fp32, KC is fp32): m and l are rescaled and summed over
    # every chunk tile of the row; the lse then sets the scale of every score exp(s - lse).
    m = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_Q,), tl.float32)
    for c0 in range(0, hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        kc = tl.load(KC + (kv * NC + cols[:, None]) * D + cols_d[None, :],
                     mask=(cols[:, None] < NC) & (cols_d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(kc)) * sm_scale
        vis = (cols[None, :] * KERNEL_STRIDE + KERNEL_SIZE - 1 <= pos[:, None]) & (cols[None, :] < NC)
        if HAS_DOC:
            kcdoc = tl.load(KCDOC + (bh // HQ) * NC + cols, mask=cols < NC, other=-1)
            vis = vis & (kcdoc[None, :] == qdoc[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
    # l >= 1 once anything is visible (the max term is exp(0)); rows with nothing get -inf.
    tl.store(LSE + bh * N + rows, tl.where(l > 0, m + tl.log(tl.maximum(l, 1.0)), float("-inf")), mask=rows < N)


@triton.jit
def _score_kernel(Q, KC, LSE, OUT, QDOC, KCDOC, q_start, N, NC, MK, HQ, HKV, D, sm_scale, KERNEL_SIZE: tl.constexpr,
                  KERNEL_STRIDE: tl.constexpr, BLOCK_SIZE: tl.constexpr, S: tl.constexpr, P: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr, KW: tl.constexpr,
                  BLOCK_D: tl.constexpr, HAS_DOC: tl.constexpr):
    bk = tl.program_id(1)  # b * HKV + kv
    G = HQ // HKV
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pos = q_start + rows
    if HAS_DOC:
        qdoc = tl.load(QDOC + (bk // HKV) * N + rows, mask=rows < N, other=-1)
    cols_d = tl.arange(0, BLOCK_D)
    last = q_start + tl.program_id(0) * BLOCK_Q + BLOCK_Q - 1
    hi = tl.minimum(MK, last // BLOCK_SIZE + 1)
    # Chunk o of block b's window is S*b - P + o, o < S + P (KW is its power-of-two cover).
    blk = tl.arange(0, BLOCK_B)
    off = tl.arange(0, KW)
    for b0 in range(0, hi, BLOCK_B):
        chunk = (b0 + blk[:, None]) * S - P + off[None, :]
        ok = (off[None, :] < S + P) & (chunk >= 0) & (chunk < NC)
        chunk = tl.reshape(chunk, (BLOCK_B * KW,))
        ok = tl.reshape(ok, (BLOCK_B * KW,))
        kc = tl.load(KC + (bk * NC + chunk[:, None]) * D + cols_d[None, :],
                     mask=ok[:, None] & (cols_d[None, :] < D), other=0.0)
        vis = ok[None, :] & (chunk[None, :] * KERNEL_STRIDE + KERNEL_SIZE - 1 <= pos[:, None])
        if HAS_DOC:
            kcdoc = tl.load(KCDOC + (bk // HKV) * NC + chunk, mask=ok, other=-1)
            vis = vis & (kcdoc[None, :] == qdoc[:, None])
        # fp32: the scores sum over the group's G query heads; top-k ranks them, and bf16's 8 bits
        # would turn near-equal blocks into ties.
        acc = tl.zeros((BLOCK_Q, BLOCK_B * KW), tl.float32)
        for g in range(G):
            bh = (bk // HKV) * HQ + (bk % HKV) * G + g
            q = _load_q(Q, bh * N * D, rows, N, D, BLOCK_D)
            lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float("-inf"))
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # nothing visible: vis masks the row anyway
            s = tl.dot(q, tl.trans(kc)) * sm_scale
            acc += tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        best = tl.max(tl.reshape(acc, (BLOCK_Q, BLOCK_B, KW)), 2)
        cols = b0 + blk
        tl.store(OUT + (bk * N + rows[:, None]) * MK + cols[None, :], best,
                 mask=(rows[:, None] < N) & (cols[None, :] < MK))


def _lse_meta(*, head_dim: int, kernel_size: int, kernel_stride: int, has_doc: bool = False) -> dict:
    """Constexprs and launch options of _lse_kernel (the same on sm_80 and sm_90)."""
    return dict(KERNEL_SIZE=kernel_size, KERNEL_STRIDE=kernel_stride, BLOCK_Q=BLOCK_Q, BLOCK_C=BLOCK_C,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_DOC=has_doc, num_warps=4, num_stages=3)


def _score_meta(*, head_dim: int, kernel_size: int, kernel_stride: int, block_size: int,
                has_doc: bool = False) -> dict:
    """Constexprs and launch options of _score_kernel (the same on sm_80 and sm_90)."""
    S, P = pool_geometry(kernel_size, kernel_stride, block_size)
    return dict(KERNEL_SIZE=kernel_size, KERNEL_STRIDE=kernel_stride, BLOCK_SIZE=block_size, S=S, P=P,
                BLOCK_Q=BLOCK_Q, BLOCK_B=BLOCK_B, KW=triton.next_power_of_2(S + P),
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_DOC=has_doc, num_warps=4, num_stages=3)


def _doc_args(q: torch.Tensor, q_doc, kc_doc) -> tuple[torch.Tensor, torch.Tensor]:
    """(QDOC, KCDOC) int32 contiguous, or two empty placeholders when there are no documents (HAS_DOC off)."""
    if q_doc is None:
        empty = torch.empty(0, dtype=torch.int32, device=q.device)
        return empty, empty
    return q_doc.to(torch.int32).contiguous(), kc_doc.to(torch.int32).contiguous()


def lse_triton(q: torch.Tensor, kc: torch.Tensor, *, kernel_size: int, kernel_stride: int,
               q_start: int = 0, q_doc: torch.Tensor | None = None,
               kc_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as infllm_v2_ref.lse_torch: q [B, Hq, C, D], kc [B, Hkv, n_c, D] fp32,
    q_doc [B, C], kc_doc [B, n_c] or None -> [B, Hq, C] fp32."""
    B, Hq, N, D = q.shape
    launch_arch(q)  # ValueError on a GPU older than sm_80, before any launch
    q, kc = q.contiguous(), kc.contiguous()
    lse = torch.empty(B, Hq, N, device=q.device, dtype=torch.float32)
    _lse_kernel[(triton.cdiv(N, BLOCK_Q), B * Hq)](q, kc, lse, *_doc_args(q, q_doc, kc_doc), q_start, N,
                                                   kc.shape[2], Hq, kc.shape[1], D, 1.0 / math.sqrt(D),
                                                   **_lse_meta(head_dim=D, kernel_size=kernel_size,
                                                               kernel_stride=kernel_stride,
                                                               has_doc=q_doc is not None))
    return lse


def block_scores_triton(q: torch.Tensor, kc: torch.Tensor, *, num_k_blocks: int, kernel_size: int,
                        kernel_stride: int, block_size: int, q_start: int = 0,
                        lse: torch.Tensor | None = None, q_doc: torch.Tensor | None = None,
                        kc_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as infllm_v2_ref.block_scores_torch: q [B, Hq, C, D],
    kc [B, Hkv, n_c, D] fp32, lse [B, Hq, C] or None (exact), q_doc [B, C] and
    kc_doc [B, n_c] or None -> [B, Hkv, C, num_k_blocks] fp32."""
    B, Hq, N, D = q.shape
    Hkv, NC = kc.shape[1], kc.shape[2]
    launch_arch(q)
    q, kc = q.contiguous(), kc.contiguous()
    if lse is None:
        lse = lse_triton(q, kc, kernel_size=kernel_size, kernel_stride=kernel_stride, q_start=q_start,
                         q_doc=q_doc, kc_doc=kc_doc)
    out = torch.zeros(B, Hkv, N, num_k_blocks, device=q.device, dtype=torch.float32)
    _score_kernel[(triton.cdiv(N, BLOCK_Q), B * Hkv)](
        q, kc, lse.contiguous(), out, *_doc_args(q, q_doc, kc_doc), q_start, N, NC, num_k_blocks, Hq, Hkv, D,
        1.0 / math.sqrt(D), **_score_meta(head_dim=D, kernel_size=kernel_size, kernel_stride=kernel_stride,
                                         block_size=block_size, has_doc=q_doc is not None))
    return out


# (kernel_size, kernel_stride, block_size) of conf/attention/infllm_v2.yaml (CPU-scaled, exact lse) and
# infllm_v2-paper.yaml (coarse lse: windows COARSE x larger), the geometries ltrain's presets launch.
PRESET_GEOMETRIES = ((8, 4, 16, "exact"), (32, 16, 64, "coarse"))


def _spec(name, fn, meta, dtype, config, default):
    meta = dict(meta)
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    pointers = dict(Q=TRITON_DTYPES[dtype], KC="fp32", LSE="fp32", OUT="fp32", QDOC="i32", KCDOC="i32")
    return AOTSpec(name, fn, signature(fn, meta, pointers, ("sm_scale",)), meta, num_warps, num_stages,
                   dict(dtype=TRITON_DTYPES[dtype], **config), default, ("N", "D"))


def aot_specs() -> list[AOTSpec]:
    """The selection kernels at the presets' geometries, both lse modes, x HEAD_DIMS in bf16 and fp32
    and at head dim 64 in fp16 (q is read as fp32 either way); default at the presets' own lse
    mode, head dims and dtypes (kernels/aot.py PRESET_*)."""
    preset_dims = {d for d, _ in PRESET_MODELS}
    settings = list(itertools.product(PRESET_DTYPES, HEAD_DIMS)) + [(torch.float16, 64)]
    specs = []
    for (ks, stride, bs, mode), (dtype, d) in itertools.product(PRESET_GEOMETRIES, settings):
        preset = dtype in PRESET_DTYPES and d in preset_dims
        for lse in LSE_MODES:
            win = dict(kernel_size=COARSE * ks, kernel_stride=COARSE * stride) if lse == "coarse" else \
                dict(kernel_size=ks, kernel_stride=stride)
            specs.append(_spec("infllm_v2_lse", _lse_kernel, _lse_meta(head_dim=d, **win), dtype,
                               dict(head_dim=d, lse=lse, **win), preset and lse == mode))
        specs.append(_spec("infllm_v2_score", _score_kernel,
                           _score_meta(head_dim=d, kernel_size=ks, kernel_stride=stride, block_size=bs), dtype,
                           dict(head_dim=d, kernel_size=ks, kernel_stride=stride, block_size=bs), preset))
    return specs
