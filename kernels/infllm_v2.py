"""InfLLM-V2 dense-sparse switchable attention (MiniCPM4; REFERENCES.md).

    N <= dense_len:  dense causal attention (the `dense` kind's SDPA call, bit for bit)
    N >  dense_len:  infllm_v2_select -> BlockLayout (per batch, KV group, query block)
                     -> block_sparse_attention, differentiable in q, k, v

No parameters of its own: selection reads the layer's q and k and is not
differentiated.

Selection granularity. The paper selects per query token; block_sparse_attention
takes one key-block list per query block. We select per query block: a block
scores max_{i in query block} s[h, i, b] (infllm_v2_ref), then top-k as per
token. A union of the per-token top-k sets would be exact but unbounded:
measured on random inputs at 4K tokens with the CPU preset (benchmarks/infllm_v2.py),
the union covers 22.3% of causal block pairs against 4.6% for the block-granular
layout (4.8x the attention work), while the block-granular layout still holds
70.7% of the per-token picks; scoring costs the same either way (0.49 s per
token vs 0.34 s per block, the difference being top-k over 16x more rows).
`granularity` (a power of two dividing block_size) exposes the choice;
granularity=1 is the paper's per-token rule and equals the naive reference exactly (tests/kernels/test_infllm_v2.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import infllm_v2_ref
from .block_sparse import BLOCK_SIZES, block_sparse_attention
from .layout import BlockLayout

IMPLS = ("auto", "triton", "torch")


def check_infllm_v2_params(*, kernel_size: int, kernel_stride: int, block_size: int, topk: int, init_blocks: int,
                           window_size: int, dense_len: int = 0, prefix: str = "") -> None:
    """ValueError naming the offending key (prefixed, e.g. "attention.infllm_v2.")."""
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


def select_blocks(scores: torch.Tensor, *, block_size: int, topk: int, init_blocks: int, window_size: int,
                  granularity: int, q_start: int = 0) -> BlockLayout:
    """scores: [B, Hkv, Mg, Mk] block scores of Mg query granules -> BlockLayout
    [B, Hkv, Mg, k], k = topk + window_size/block_size: init and local blocks
    forced (+inf), blocks past the granule's own block q_blk never picked."""
    Mg, Mk = scores.shape[2], scores.shape[3]
    dev = scores.device
    q_blk = ((q_start + torch.arange(Mg, device=dev) * granularity) // block_size)[:, None]
    b = torch.arange(Mk, device=dev)
    local = window_size // block_size
    s = scores.masked_fill((b < init_blocks) | ((b >= q_blk - local) & (b <= q_blk)), float("inf"))
    s = s.masked_fill(b > q_blk, float("-inf"))
    vals, idx = s.topk(min(topk + local, Mk), dim=-1)
    return BlockLayout.from_indices(torch.where(vals > float("-inf"), idx, -1), Mk)


def _check(q, k, *, kernel_size, block_size, granularity, q_start, impl):
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch and head dim must match and q heads "
                         "must be a multiple of k heads")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if granularity < 1 or block_size % granularity or granularity & (granularity - 1):
        raise ValueError(f"granularity={granularity} must be a power of two dividing block_size={block_size}")
    if q.shape[2] % block_size or k.shape[2] % block_size:
        raise ValueError(f"sequence lengths (q {q.shape[2]}, k {k.shape[2]}) must be multiples of "
                         f"block_size={block_size}: pad the sequence")
    if q_start % block_size:
        raise ValueError(f"q_start={q_start} must be a multiple of block_size={block_size}")
    if k.shape[2] < kernel_size:
        raise ValueError(f"k has {k.shape[2]} tokens, fewer than one compression window (kernel_size={kernel_size})")


@torch.no_grad()
def infllm_v2_select(q: torch.Tensor, k: torch.Tensor, *, kernel_size: int, kernel_stride: int, block_size: int,
                     topk: int, init_blocks: int, window_size: int, q_start: int = 0, granularity: int | None = None,
                     impl: str = "auto") -> BlockLayout:
    """Top-k key blocks per KV group and query granule (no gradient).

    q: [B, Hq, Nq, D] at global positions q_start.., k: [B, Hkv, Nk, D] at 0..
    (Nq, Nk, q_start multiples of block_size). Returns a BlockLayout with
    counts [B, Hkv, Nq / granularity] and indices [..., topk + window_size/block_size];
    granularity defaults to block_size, i.e. a layout block_sparse_attention
    takes. impl: "auto" (Triton on CUDA, PyTorch on CPU), "triton", "torch".
    """
    granularity = block_size if granularity is None else granularity
    check_infllm_v2_params(kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size, topk=topk,
                           init_blocks=init_blocks, window_size=window_size)
    _check(q, k, kernel_size=kernel_size, block_size=block_size, granularity=granularity, q_start=q_start, impl=impl)
    if impl == "triton" or (impl == "auto" and q.is_cuda):
        from . import infllm_v2_triton  # triton is optional on CPU boxes
        block_scores = infllm_v2_triton.block_scores_triton
    else:
        block_scores = infllm_v2_ref.block_scores_torch
    kc = infllm_v2_ref.compress_keys(k, kernel_size, kernel_stride)
    scores = block_scores(q, kc, num_k_blocks=k.shape[2] // block_size, kernel_size=kernel_size,
                          kernel_stride=kernel_stride, block_size=block_size, granularity=granularity, q_start=q_start)
    return select_blocks(scores, block_size=block_size, topk=topk, init_blocks=init_blocks, window_size=window_size,
                         granularity=granularity, q_start=q_start)


def attended_fraction(layout: BlockLayout) -> float:
    """Attended (query block, key block) pairs over the causal pairs dense
    attention visits (q and k aligned at block 0). One host sync."""
    Bl, Hl, Mq = layout.counts.shape
    return layout.counts.sum().item() / (Bl * Hl * Mq * (Mq + 1) // 2)


def infllm_v2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size: int, kernel_stride: int,
                        block_size: int, topk: int, init_blocks: int, window_size: int, dense_len: int,
                        impl: str = "auto") -> tuple[torch.Tensor, dict]:
    """Causal self-attention, q: [B, Hq, N, D], k, v: [B, Hkv, N, D] -> (o [B, Hq, N, D], stats).

    N <= dense_len: o = softmax(q k^T / sqrt(D) + causal) v via SDPA, exactly
    as the `dense` kind. Otherwise o_i attends, with exact softmax, to the
    keys of the blocks infllm_v2_select picks for i's query block and KV group.
    stats: {"mode": "dense" | "sparse", "block_fraction": attended / causal block pairs}.
    """
    check_infllm_v2_params(kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size, topk=topk,
                           init_blocks=init_blocks, window_size=window_size, dense_len=dense_len)
    if q.shape[2] <= dense_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), \
            {"mode": "dense", "block_fraction": 1.0}
    layout = infllm_v2_select(q, k, kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size,
                              topk=topk, init_blocks=init_blocks, window_size=window_size, impl=impl)
    out = block_sparse_attention(q, k, v, layout, block_size=block_size, impl=impl)
    return out, {"mode": "sparse", "block_fraction": attended_fraction(layout)}
