"""PyTorch references for InfLLM-V2 block selection (REFERENCES.md, "InfLLM-V2").

With G = Hq / Hkv query heads per KV group, query i at global position
t_i = q_start + i, and compressed keys (mean pooling, full windows only)

    K_c[j] = mean(k[j*stride : j*stride + kernel_size]),  j < n_c = (Nk - kernel_size) // stride + 1

the score of query i against chunk j, summed over the heads of a group, is

    p[h, i, j] = sum_g exp(q_{g,i} . K_c[j] / sqrt(D) - lse_{g,i})   if j*stride + kernel_size - 1 <= t_i, else 0

(lse over the visible chunks, so each head's row sums to 1), and the score of
key block b is the max over the chunks overlapping it:

    s[h, i, b] = max_{j : j*stride < (b+1)*block_size, j*stride + kernel_size > b*block_size} p[h, i, j]

which is 1-D max pooling with stride S = block_size / stride, padding
P = ceil(kernel_size / stride) - 1 and kernel S + P (kernel 5, stride 4,
padding 1 at the public 32/16/64).

Two functions: `select_naive`, the per-token oracle written straight from
these equations (materialises [Nq, n_c]; small shapes only), and
`block_scores_torch`, the production CPU path, which walks query chunks so
memory stays bounded and takes the max over `granularity` consecutive queries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of one query chunk's [B, Hq, C, n_c] score tensor (fp32): ~32 MiB.
CHUNK_ELEMENTS = 1 << 23


def compress_keys(k: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """k: [B, Hkv, Nk, D] -> K_c: [B, Hkv, n_c, D] fp32, means over full windows."""
    return k.float().unfold(2, kernel_size, kernel_stride).mean(-1)


def pool_geometry(kernel_size: int, kernel_stride: int, block_size: int) -> tuple[int, int]:
    """(S, P): block b pools chunks [S*b - P, S*b + S), those overlapping its tokens."""
    return block_size // kernel_stride, -(-kernel_size // kernel_stride) - 1


def visible(n_c: int, positions: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """bool [len(positions), n_c]: chunk j lies wholly at or before the query."""
    j = torch.arange(n_c, device=positions.device)
    return j[None, :] * kernel_stride + kernel_size - 1 <= positions[:, None]


def block_scores_torch(q: torch.Tensor, kc: torch.Tensor, *, num_k_blocks: int, kernel_size: int,
                       kernel_stride: int, block_size: int, granularity: int, q_start: int = 0) -> torch.Tensor:
    """q: [B, Hq, Nq, D], kc: [B, Hkv, n_c, D] -> s [B, Hkv, Nq / granularity, num_k_blocks] fp32:
    the block scores above, max over each run of `granularity` queries (the max
    over tokens commutes with the max pooling). Invisible blocks score 0.

    Each query chunk scores only the chunks its last query can see (causal
    prefix), and masks only the band where visibility changes."""
    B, Hq, Nq, D = q.shape
    Hkv, n_c = kc.shape[1], kc.shape[2]
    G = Hq // Hkv
    S, P = pool_geometry(kernel_size, kernel_stride, block_size)
    step = max(granularity, CHUNK_ELEMENTS // max(1, B * Hq * n_c) // granularity * granularity)
    qs = q.float() / math.sqrt(D)
    out = torch.zeros(B, Hkv, Nq // granularity, num_k_blocks, device=q.device)
    for start in range(0, Nq, step):
        C = min(step, Nq - start)
        first, last = q_start + start, q_start + start + C - 1
        hi = min(n_c, max(0, (last - kernel_size + 1) // kernel_stride + 1))  # chunks visible to the last query
        if hi == 0:
            continue
        lo = min(hi, max(0, (first - kernel_size + 1) // kernel_stride + 1))  # visible to every query
        s = torch.matmul(qs[:, :, start:start + C].reshape(B, Hkv, G * C, D), kc[:, :, :hi].transpose(-1, -2))
        s = s.view(B, Hkv, G, C, hi)
        pos = torch.arange(first, last + 1, device=q.device)
        s[..., lo:].masked_fill_(~visible(hi, pos, kernel_size, kernel_stride)[:, lo:], float("-inf"))
        p = torch.softmax(s, dim=-1)
        if first < kernel_size - 1:
            p.nan_to_num_(0.0)  # queries that see no chunk yet
        p = p.sum(2).unflatten(2, (-1, granularity)).amax(3)
        # Scores are >= 0, so zero padding leaves every max unchanged; the
        # right pad makes exactly num_k_blocks windows.
        p = F.pad(p, (P, S * num_k_blocks - hi))
        out[:, :, start // granularity:(start + C) // granularity] = \
            F.max_pool1d(p.flatten(0, 2)[:, None], S + P, S).view(*p.shape[:3], num_k_blocks)
    return out


def select_naive(q: torch.Tensor, k: torch.Tensor, *, kernel_size: int, kernel_stride: int, block_size: int,
                 topk: int, init_blocks: int, window_size: int, q_start: int = 0) -> torch.Tensor:
    """Per-token selection, the oracle: bool [B, Hkv, Nq, Mk], Mk = Nk / block_size.

    Per query token: blocks b < init_blocks and q_blk - window_size/block_size <= b <= q_blk
    are forced (+inf), blocks past q_blk are excluded, and the top
    k = topk + window_size/block_size blocks by s[h, i, b] are kept."""
    Nq, Nk = q.shape[2], k.shape[2]
    Mk = Nk // block_size
    kc = compress_keys(k, kernel_size, kernel_stride)
    pos = torch.arange(q_start, q_start + Nq, device=q.device)
    B, Hq, _, D = q.shape
    Hkv, n_c = kc.shape[1], kc.shape[2]
    scores = torch.einsum("bhgid,bhjd->bhgij", q.float().view(B, Hkv, Hq // Hkv, Nq, D), kc) / math.sqrt(D)
    scores = scores.masked_fill(~visible(n_c, pos, kernel_size, kernel_stride), float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0).sum(2)  # [B, Hkv, Nq, n_c]
    j = torch.arange(kc.shape[2], device=q.device)[:, None]
    b = torch.arange(Mk, device=q.device)
    overlap = (j * kernel_stride < (b + 1) * block_size) & (j * kernel_stride + kernel_size > b * block_size)
    s = (p[..., :, None] * overlap).amax(-2)  # [B, Hkv, Nq, Mk]
    local = window_size // block_size
    q_blk = (pos // block_size)[:, None]
    s = s.masked_fill((b < init_blocks) | ((b >= q_blk - local) & (b <= q_blk)), float("inf"))
    s = s.masked_fill(b > q_blk, float("-inf"))
    idx = s.topk(min(topk + local, Mk), dim=-1).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    return mask & (s > float("-inf"))
