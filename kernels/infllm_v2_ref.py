"""PyTorch references for InfLLM-V2 block selection (docs/algorithms.md#infllm-v2).

With G = Hq / Hkv query heads per KV group, query i at global position
t_i = q_start + i, and compressed keys (mean pooling, full windows only)

    K_c[j] = mean(k[j*stride : j*stride + kernel_size]),  j < n_c = (Nk - kernel_size) // stride + 1

the score of query i against chunk j, summed over the heads of a group, is

    p[h, i, j] = sum_g exp(q_{g,i} . K_c[j] / sqrt(D) - lse_{g,i})   if j*stride + kernel_size - 1 <= t_i, else 0

(lse_{g,i} below), and the score of key block b is the max over the chunks overlapping it:

    s[h, i, b] = max_{j : j*stride < (b+1)*block_size, j*stride + kernel_size > b*block_size} p[h, i, j]

which is 1-D max pooling with stride S = block_size / stride, padding
P = ceil(kernel_size / stride) - 1 and kernel S + P (kernel 5, stride 4,
padding 1 at the public 32/16/64).

The normaliser lse_{g,i} is, by `lse`:

    "exact":  log sum_j exp(q_{g,i} . K_c[j] / sqrt(D)) over the visible chunks (each head's row sums to 1);
    "coarse": the same sum over the coarser K_c2 (windows of COARSE * kernel_size every
              COARSE * kernel_stride: 128 / 64 at the public 32 / 16), as MiniCPM4's public
              code estimates it: 1/4 of the chunks, so a Triton scorer's lse pass is 4x cheaper.
              A query that sees no coarse chunk yet (the first ~4 windows, whose blocks are all
              forced init / local blocks at every shipped setting) uses lse = 0.

Selection is per query token: every token ranks the key blocks by s[h, i, b]
alone, so what token i attends never depends on a later query (causality).

Packed documents (q_doc [B, Nq], k_doc [B, Nk] document ids, non-decreasing
along the row): chunk j is visible to query i only if it also lies wholly in
i's document. With non-decreasing ids and causality (the window ends at or
before t_i) that is one comparison, k_doc[j*stride] == q_doc[i] (`chunk_docs`):
a window that spans a boundary starts in an earlier document. So no summary
mixes two documents, and a document shorter than kernel_size has none.

Functions: `select_naive`, the per-token oracle written straight from these
equations (materialises [Nq, n_c]; small shapes only), and `block_scores_torch`
and `lse_torch`, the production CPU path for one chunk of queries (the caller,
kernels/infllm_v2.py, walks query chunks so memory stays bounded).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of one query chunk's [B, Hq, C, n_c] score tensor (fp32): ~32 MiB.
CHUNK_ELEMENTS = 1 << 23
# K_c2 windows and strides are COARSE x those of K_c (public implementation: 128 / 64 for 32 / 16).
COARSE = 4
LSE_MODES = ("exact", "coarse")


def compress_keys(k: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """k: [B, Hkv, Nk, D] -> K_c: [B, Hkv, n_c, D] fp32, means over full windows."""
    # fp32: the mean sums kernel_size keys, and the summaries feed every score the top-k ranks.
    return k.float().unfold(2, kernel_size, kernel_stride).mean(-1)


def chunk_docs(k_doc: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """k_doc: [B, Nk] -> [B, n_c], the document of each window's first token (see the module doc)."""
    n_c = (k_doc.shape[1] - kernel_size) // kernel_stride + 1
    return k_doc[:, : (n_c - 1) * kernel_stride + 1 : kernel_stride]


def pool_geometry(kernel_size: int, kernel_stride: int, block_size: int) -> tuple[int, int]:
    """(S, P): block b pools chunks [S*b - P, S*b + S), those overlapping its tokens."""
    return block_size // kernel_stride, -(-kernel_size // kernel_stride) - 1


def visible(n_c: int, positions: torch.Tensor, kernel_size: int, kernel_stride: int,
            q_doc: torch.Tensor | None = None, kc_doc: torch.Tensor | None = None) -> torch.Tensor:
    """bool [len(positions), n_c]: chunk j lies wholly at or before the query; with
    q_doc [B, C] and kc_doc [B, n_c] (chunk_docs) also in its document: [B, 1, C, n_c]."""
    j = torch.arange(n_c, device=positions.device)
    vis = j[None, :] * kernel_stride + kernel_size - 1 <= positions[:, None]
    if q_doc is None:
        return vis
    return (vis & (kc_doc[:, None, :n_c] == q_doc[:, :, None]))[:, None]


def _visible_prefix(q_start: int, n: int, n_c: int, kernel_size: int, kernel_stride: int) -> tuple[int, int]:
    """(lo, hi): chunks [0, lo) are visible to every query of q_start .. q_start + n - 1, [0, hi) to the last."""
    first, last = q_start, q_start + n - 1
    hi = min(n_c, max(0, (last - kernel_size + 1) // kernel_stride + 1))
    return min(hi, max(0, (first - kernel_size + 1) // kernel_stride + 1)), hi


def _chunk_scores(q: torch.Tensor, kc: torch.Tensor, hi: int, lo: int, q_start: int, kernel_size: int,
                  kernel_stride: int, q_doc=None, kc_doc=None) -> torch.Tensor:
    """[B, Hkv, G, C, hi] scaled scores against the visible prefix of chunks, -inf where invisible
    (by position from chunk lo on; with documents, everywhere: earlier documents' chunks too)."""
    B, Hq, C, D = q.shape
    Hkv = kc.shape[1]
    # fp32 scores (the Triton kernels' too): the lse, the exp-sums over the group's heads and the
    # max pooling that follow are all fp32, so near-equal blocks do not tie in the top-k.
    s = torch.matmul((q.float() / math.sqrt(D)).reshape(B, Hkv, Hq // Hkv * C, D), kc[:, :, :hi].transpose(-1, -2))
    s = s.view(B, Hkv, Hq // Hkv, C, hi)
    pos = torch.arange(q_start, q_start + C, device=q.device)
    if q_doc is not None:
        return s.masked_fill_(~visible(hi, pos, kernel_size, kernel_stride, q_doc, kc_doc)[:, :, None], float("-inf"))
    s[..., lo:].masked_fill_(~visible(hi, pos, kernel_size, kernel_stride)[:, lo:], float("-inf"))
    return s


def lse_torch(q: torch.Tensor, kc: torch.Tensor, *, kernel_size: int, kernel_stride: int,
              q_start: int = 0, q_doc: torch.Tensor | None = None,
              kc_doc: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, Hq, C, D], kc: [B, Hkv, n_c, D] (windows kernel_size, stride kernel_stride)
    -> lse [B, Hq, C] fp32 over each query's visible chunks, -inf where none.
    q_doc [B, C], kc_doc [B, n_c] (chunk_docs): only chunks of the query's document."""
    B, Hq, C, _ = q.shape
    lo, hi = _visible_prefix(q_start, C, kc.shape[2], kernel_size, kernel_stride)
    if hi == 0:
        return torch.full((B, Hq, C), float("-inf"), device=q.device)
    s = _chunk_scores(q, kc, hi, lo, q_start, kernel_size, kernel_stride, q_doc, kc_doc)
    return torch.logsumexp(s, -1).view(B, Hq, C)


def block_scores_torch(q: torch.Tensor, kc: torch.Tensor, *, num_k_blocks: int, kernel_size: int,
                       kernel_stride: int, block_size: int, q_start: int = 0,
                       lse: torch.Tensor | None = None, q_doc: torch.Tensor | None = None,
                       kc_doc: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, Hq, C, D] at q_start.., kc: [B, Hkv, n_c, D] -> s [B, Hkv, C, num_k_blocks]
    fp32, the per-token block scores above. lse [B, Hq, C] (the coarse estimate)
    or None (exact, from the same scores). Invisible blocks score 0. q_doc [B, C],
    kc_doc [B, n_c] (chunk_docs): only chunks of the query's document are visible.

    Scores only the chunks the chunk's last query can see (causal prefix), and
    masks only the band where visibility changes."""
    B, Hq, C, _ = q.shape
    Hkv, n_c = kc.shape[1], kc.shape[2]
    S, P = pool_geometry(kernel_size, kernel_stride, block_size)
    lo, hi = _visible_prefix(q_start, C, n_c, kernel_size, kernel_stride)
    if hi == 0:
        return torch.zeros(B, Hkv, C, num_k_blocks, device=q.device)
    s = _chunk_scores(q, kc, hi, lo, q_start, kernel_size, kernel_stride, q_doc, kc_doc)
    if lse is None:
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # nan: queries that see no chunk yet
    else:
        p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0).view(B, Hkv, Hq // Hkv, C, 1))
    p = p.sum(2).flatten(0, 2)[:, None]  # [B * Hkv * C, 1, hi]
    if P <= S:
        # Pool only the blocks that have a visible chunk (ceil_mode keeps the last,
        # partial one); the others score 0, as scores >= 0 make zero padding neutral.
        s = F.max_pool1d(p, S + P, S, padding=P, ceil_mode=True)[..., 0, :num_k_blocks]
        return F.pad(s, (0, num_k_blocks - s.shape[-1])).view(B, Hkv, C, num_k_blocks)
    p = F.pad(p, (P, S * num_k_blocks - hi))  # max_pool1d allows padding <= kernel / 2 only
    return F.max_pool1d(p, S + P, S).view(B, Hkv, C, num_k_blocks)


def doc_first_block(q_doc: torch.Tensor, k_doc: torch.Tensor, block_size: int) -> torch.Tensor:
    """q_doc [B, Nq], k_doc [B, Nk] (keys from position 0, non-decreasing) -> int64 [B, Nq]:
    the key block holding the first token of each query's document."""
    return torch.searchsorted(k_doc.contiguous(), q_doc.to(k_doc.dtype).contiguous()) // block_size


def select_naive(q: torch.Tensor, k: torch.Tensor, *, kernel_size: int, kernel_stride: int, block_size: int,
                 topk: int, init_blocks: int, window_size: int, q_start: int = 0, lse: str = "exact",
                 q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token selection, the oracle: bool [B, Hkv, Nq, Mk], Mk = Nk / block_size.

    Per query token: blocks b < init_blocks and q_blk - window_size/block_size <= b <= q_blk
    are forced (+inf), blocks past q_blk are excluded, and the top
    k = topk + window_size/block_size blocks by s[h, i, b] are kept.
    With documents (q_doc [B, Nq], k_doc [B, Nk]): chunks of other documents are
    invisible, blocks before the block of the document's first token (f) are
    excluded, and the init blocks are the document's own, f <= b < f + init_blocks."""
    Nq, Nk = q.shape[2], k.shape[2]
    Mk = Nk // block_size
    kc = compress_keys(k, kernel_size, kernel_stride)
    pos = torch.arange(q_start, q_start + Nq, device=q.device)
    B, Hq, _, D = q.shape
    Hkv, n_c = kc.shape[1], kc.shape[2]
    docs = q_doc is not None

    def vis(n, ks, stride):  # [.., Nq, n] broadcasting against [B, Hkv, G, Nq, n]
        if not docs:
            return visible(n, pos, ks, stride)
        return visible(n, pos, ks, stride, q_doc, chunk_docs(k_doc, ks, stride))[:, :, None]

    qg = q.float().view(B, Hkv, Hq // Hkv, Nq, D)
    scores = torch.einsum("bhgid,bhjd->bhgij", qg, kc) / math.sqrt(D)
    scores = scores.masked_fill(~vis(n_c, kernel_size, kernel_stride), float("-inf"))
    if lse == "exact":
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    else:
        kc2 = compress_keys(k, COARSE * kernel_size, COARSE * kernel_stride)
        s2 = torch.einsum("bhgid,bhjd->bhgij", qg, kc2) / math.sqrt(D)
        s2 = s2.masked_fill(~vis(kc2.shape[2], COARSE * kernel_size, COARSE * kernel_stride), float("-inf"))
        l2 = torch.logsumexp(s2, -1, keepdim=True)
        p = torch.exp(scores - l2.masked_fill(l2 == float("-inf"), 0.0))
    p = p.sum(2)  # [B, Hkv, Nq, n_c]
    j = torch.arange(kc.shape[2], device=q.device)[:, None]
    b = torch.arange(Mk, device=q.device)
    overlap = (j * kernel_stride < (b + 1) * block_size) & (j * kernel_stride + kernel_size > b * block_size)
    s = (p[..., :, None] * overlap).amax(-2)  # [B, Hkv, Nq, Mk]
    local = window_size // block_size
    q_blk = (pos // block_size)[:, None]
    first = doc_first_block(q_doc, k_doc, block_size)[:, None, :, None] if docs else 0
    s = s.masked_fill((b < first + init_blocks) | ((b >= q_blk - local) & (b <= q_blk)), float("inf"))
    s = s.masked_fill((b > q_blk) | (b < first), float("-inf"))
    idx = s.topk(min(topk + local, Mk), dim=-1).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    return mask & (s > float("-inf"))
