"""InfLLM-V2 dense-sparse switchable attention (MiniCPM4; docs/algorithms.md#infllm-v2).

    N <= dense_len:  dense causal attention (the `dense` kind's SDPA call, bit for bit)
    N >  dense_len:  infllm_v2_select -> token layout (per batch, KV group, query token)
                     -> block_sparse_attention, differentiable in q, k, v

No parameters of its own: selection reads the layer's q and k and is not
differentiated.

Selection is per query token, as in the paper and the public kernel: token i
ranks key blocks by its own scores summed over the G query heads of its KV
group, and those G heads attend exactly the token's selected blocks. So the
output at i never depends on q, k, v past i (the causality contract).

Packed documents (doc_ids [B, N], or q_doc / k_doc for a query chunk against
all keys): a token attends only earlier tokens of its own document. Summary
windows that span a boundary count for no query (infllm_v2_ref.chunk_docs),
selection ranks only blocks holding tokens of the query's document, the init
blocks are the document's first blocks, and block_sparse_attention masks the
boundary blocks token by token. The dense-sparse switch reads the row length
N, not the document lengths: one mode per step for every row and document.

Changed at stop 10: earlier versions selected once per query block from the
max over the block's queries, which let a later query of a block steer which
blocks the earlier ones attended (a channel from the future; ~0.78 output
change at N=512 with the CPU preset). Checkpoints trained that way are not
causal; retrain or continue training with this version.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import infllm_v2_ref
from .infllm_v2_ref import CHUNK_ELEMENTS, COARSE, LSE_MODES
from .block_sparse import BLOCK_SIZES, DTYPES, DTYPES_WHY, block_sparse_attention
from .doc_ids import check_doc_pair
from .impl import check_dtypes, use_triton
from .layout import BlockLayout

def check_infllm_v2_params(*, kernel_size: int, kernel_stride: int, block_size: int, topk: int, init_blocks: int,
                           window_size: int, dense_len: int = 0, lse: str = "exact", prefix: str = "") -> None:
    """ValueError naming the offending key (prefixed, e.g. "attention.infllm_v2.")."""
    if lse not in LSE_MODES:
        raise ValueError(f"{prefix}lse={lse!r}: allowed {', '.join(LSE_MODES)}")
    values = dict(kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size, topk=topk,
                  window_size=window_size)
    for key, val in values.items():
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{prefix}{key}={val!r} must be a positive integer")
    for key, val in dict(init_blocks=init_blocks, dense_len=dense_len).items():
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{prefix}{key}={val!r} must be a non-negative integer")
    if kernel_stride > kernel_size:
        raise ValueError(f"{prefix}kernel_stride={kernel_stride} is larger than {prefix}kernel_size={kernel_size}: "
                         "compression windows would skip tokens")
    if block_size % kernel_stride:
        raise ValueError(f"{prefix}block_size={block_size} is not a multiple of {prefix}kernel_stride={kernel_stride}: "
                         "max pooling onto blocks needs a whole number of chunk strides per block")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{prefix}block_size={block_size} must be one of {BLOCK_SIZES} (block_sparse_attention's tiles)")
    if window_size < block_size:
        raise ValueError(f"{prefix}window_size={window_size} is smaller than {prefix}block_size={block_size}: "
                         "the local window must cover at least one block")
    forced = init_blocks + window_size // block_size
    if topk < forced:
        raise ValueError(f"{prefix}topk={topk} is smaller than the forced blocks, init_blocks + window_size/block_size "
                         f"= {init_blocks} + {window_size // block_size} = {forced}")


def select_topk(scores: torch.Tensor, *, block_size: int, topk: int, init_blocks: int, window_size: int,
                q_start: int = 0, first_block: torch.Tensor | int = 0) -> torch.Tensor:
    """scores: [B, Hkv, C, Mk] per-token block scores of queries q_start.. ->
    indices [B, Hkv, C, k] int32, k = topk + window_size/block_size: init and
    local blocks forced (+inf), blocks past the token's own block never picked (-1).
    first_block: [B, C] the block of each token's document start (packed documents;
    infllm_v2_ref.doc_first_block), whose init blocks count from it and before
    which nothing is picked; 0: the row is one document.

    Overlapping pooling windows make exact ties (two blocks sharing their best
    chunk); every row is ranked at the full width Mk, so a token's picks do
    not depend on how queries were chunked (or split over ranks)."""
    C, Mk = scores.shape[2], scores.shape[3]
    dev = scores.device
    q_blk = ((q_start + torch.arange(C, device=dev)) // block_size)[:, None]
    b = torch.arange(Mk, device=dev)
    local = window_size // block_size
    if torch.is_tensor(first_block):
        first_block = first_block[:, None, :, None]
    forced = (b < first_block + init_blocks) | (b >= q_blk - local)
    s = torch.where((b > q_blk) | (b < first_block), float("-inf"), torch.where(forced, float("inf"), scores))
    vals, idx = s.topk(min(topk + local, Mk), dim=-1)
    return torch.where(vals > float("-inf"), idx, -1).to(torch.int32)


def _check(q, k, *, kernel_size, block_size, q_start, impl):
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch and head dim must match and q heads "
                         "must be a multiple of k heads")
    use_triton(q, impl)  # validates impl
    check_dtypes("infllm_v2_select", DTYPES, DTYPES_WHY, q=q, k=k)
    if q.shape[2] % block_size or k.shape[2] % block_size:
        raise ValueError(f"sequence lengths (q {q.shape[2]}, k {k.shape[2]}) must be multiples of "
                         f"block_size={block_size}: pad the sequence")
    if q_start % block_size:
        raise ValueError(f"q_start={q_start} must be a multiple of block_size={block_size}")
    if k.shape[2] < kernel_size:
        raise ValueError(f"k has {k.shape[2]} tokens, fewer than one compression window (kernel_size={kernel_size})")


@torch.no_grad()
def infllm_v2_select(q: torch.Tensor, k: torch.Tensor, *, kernel_size: int, kernel_stride: int, block_size: int,
                     topk: int, init_blocks: int, window_size: int, q_start: int = 0, lse: str = "exact",
                     q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
                     impl: str = "auto") -> BlockLayout:
    """Top-k key blocks per KV group and query token (no gradient).

    q: [B, Hq, Nq, D] at global positions q_start.., k: [B, Hkv, Nk, D] at 0..
    (Nq, Nk, q_start multiples of block_size). Returns a token layout (the
    kind block_sparse_attention takes) with counts [B, Hkv, Nq] and indices
    [B, Hkv, Nq, topk + window_size/block_size]. lse: "exact" or "coarse"
    (infllm_v2_ref). q_doc [B, Nq], k_doc [B, Nk]: document ids of packed rows
    (both or neither; see the module doc). impl: "auto" (Triton on CUDA, PyTorch
    on CPU), "triton", "torch".

    Queries are scored and ranked chunk by chunk, so the [Nq, Mk] score
    matrix never exists whole.
    """
    check_infllm_v2_params(kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size, topk=topk,
                           init_blocks=init_blocks, window_size=window_size, lse=lse)
    _check(q, k, kernel_size=kernel_size, block_size=block_size, q_start=q_start, impl=impl)
    check_doc_pair(q, k, q_doc, k_doc)
    if use_triton(q, impl):
        from . import infllm_v2_triton  # triton is optional on CPU boxes
        block_scores, lse_fn = infllm_v2_triton.block_scores_triton, infllm_v2_triton.lse_triton
    else:
        block_scores, lse_fn = infllm_v2_ref.block_scores_torch, infllm_v2_ref.lse_torch
    B, Hq, Nq, _ = q.shape
    Mk = k.shape[2] // block_size
    kc = infllm_v2_ref.compress_keys(k, kernel_size, kernel_stride)
    coarse = dict(kernel_size=COARSE * kernel_size, kernel_stride=COARSE * kernel_stride)
    kc2 = infllm_v2_ref.compress_keys(k, **coarse) if lse == "coarse" and k.shape[2] >= coarse["kernel_size"] else None
    width = max(kc.shape[2] * Hq, Mk * k.shape[1])
    step = max(block_size, CHUNK_ELEMENTS // max(1, B * width) // block_size * block_size)
    kc_doc = kc2_doc = first = None
    if q_doc is not None:  # per summary: the document of its first token; per query: its document's first block
        kc_doc = infllm_v2_ref.chunk_docs(k_doc, kernel_size, kernel_stride)
        kc2_doc = infllm_v2_ref.chunk_docs(k_doc, **coarse) if kc2 is not None else None
        first = infllm_v2_ref.doc_first_block(q_doc, k_doc, block_size)
    picks = []
    for a in range(0, Nq, step):
        qa, start = q[:, :, a:a + step], q_start + a
        qa_doc, first_a = (q_doc[:, a:a + step], first[:, a:a + step]) if q_doc is not None else (None, 0)
        est = None
        if lse == "coarse":
            est = lse_fn(qa, kc2, **coarse, q_start=start, q_doc=qa_doc, kc_doc=kc2_doc) if kc2 is not None else \
                torch.full(qa.shape[:3], float("-inf"), device=q.device)
        scores = block_scores(qa, kc, num_k_blocks=Mk, kernel_size=kernel_size, kernel_stride=kernel_stride,
                              block_size=block_size, q_start=start, lse=est, q_doc=qa_doc, kc_doc=kc_doc)
        picks.append(select_topk(scores, block_size=block_size, topk=topk, init_blocks=init_blocks,
                                 window_size=window_size, q_start=start, first_block=first_a))
    return BlockLayout.from_indices(torch.cat(picks, dim=2), Mk)


def causal_pairs(num_tokens: int, block_size: int) -> int:
    """(query token, key block) pairs of causal dense attention over num_tokens tokens (q, k aligned at 0)."""
    m = num_tokens // block_size
    return block_size * m * (m + 1) // 2


def attended_fraction(layout: BlockLayout, block_size: int) -> torch.Tensor:
    """Attended (token, key block) pairs of a token layout over the causal
    pairs dense attention visits (q and k aligned at 0): a 0-dim float64
    tensor on the layout's device, so no host sync until someone reads it."""
    Bl, Hl, Nq = layout.counts.shape
    return layout.counts.sum(dtype=torch.float64) / (Bl * Hl * causal_pairs(Nq, block_size))


@functools.lru_cache(maxsize=16)
def _causal_layout(num_blocks: int, device: torch.device) -> BlockLayout:
    """BlockLayout.causal(M, M), built once per (M, device): dense mode over packed documents."""
    return BlockLayout.causal(num_blocks, num_blocks, device=device)


def infllm_v2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size: int, kernel_stride: int,
                        block_size: int, topk: int, init_blocks: int, window_size: int, dense_len: int,
                        lse: str = "exact", doc_ids: torch.Tensor | None = None,
                        impl: str = "auto") -> tuple[torch.Tensor, dict]:
    """Causal self-attention, q: [B, Hq, N, D], k, v: [B, Hkv, N, D] -> (o [B, Hq, N, D], stats).

    N <= dense_len: o = softmax(q k^T / sqrt(D) + causal) v via SDPA, exactly
    as the `dense` kind. Otherwise o_i attends, with exact softmax, to the
    keys of the blocks infllm_v2_select picks for token i and its KV group.
    doc_ids [B, N]: packed documents (module doc); dense mode is then
    block_sparse_attention's causal layout with the document mask (N a multiple of block_size).
    stats: {"mode": "dense" | "sparse", "block_fraction": attended / causal (token, key block) pairs},
    the fraction 1.0 when dense, else attended_fraction's 0-dim tensor (reading it syncs with the device).
    """
    check_infllm_v2_params(kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size, topk=topk,
                           init_blocks=init_blocks, window_size=window_size, dense_len=dense_len, lse=lse)
    # Both modes take block_sparse_attention's dtypes, so a run does not fail only once N passes dense_len.
    check_dtypes("infllm_v2_attention", DTYPES, DTYPES_WHY, q=q, k=k, v=v)
    docs = {} if doc_ids is None else dict(q_doc=doc_ids, k_doc=doc_ids)
    if q.shape[2] <= dense_len and doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), \
            {"mode": "dense", "block_fraction": 1.0}
    if q.shape[2] <= dense_len:
        if q.shape[2] % block_size:
            raise ValueError(f"packed documents need the sequence length ({q.shape[2]}) to be a multiple of "
                             f"block_size={block_size}: pad the sequence")
        out = block_sparse_attention(q, k, v, _causal_layout(q.shape[2] // block_size, q.device),
                                     block_size=block_size, impl=impl, **docs)
        return out, {"mode": "dense", "block_fraction": 1.0}
    layout = infllm_v2_select(q, k, kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size,
                              topk=topk, init_blocks=init_blocks, window_size=window_size, lse=lse, impl=impl,
                              **docs)
    out = block_sparse_attention(q, k, v, layout, block_size=block_size, impl=impl, **docs)
    return out, {"mode": "sparse", "block_fraction": attended_fraction(layout, block_size)}
