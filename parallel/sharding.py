"""Split a batch's sequence dimension over the context-parallel ranks, and gather it back.

contiguous: rank r holds tokens [r N/P, (r+1) N/P) -- what LASP-2 needs, since
            its prefix states follow rank order.
zigzag:     the sequence is cut into 2P chunks and rank r holds chunks r and
            2P-1-r, so every rank gets the same amount of causal-attention work
            (ring attention's load balance).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ltrain.kernels.doc_ids import check_doc_ids

from . import comm

MODES = ("zigzag", "contiguous")


def dense_block_size(chunk_len: int) -> int:
    """Dense attention's tile over one sequence chunk (ring or LASP-2H): the largest
    power-of-two block <= 64 that divides chunk_len, so a chunk holds whole blocks."""
    bs = 64
    while chunk_len % bs:
        bs //= 2
    return bs


def check_split(n: int, cp: int, mode: str, block_size: int = 1, who: str = "shard_sequence") -> int:
    """The one rule of every split: N tokens cut into cp (contiguous) or 2 cp (zigzag)
    chunks of whole blocks. Returns the number of chunks; ValueError naming `who` otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed {', '.join(MODES)}")
    chunks = 2 * cp if mode == "zigzag" else cp
    if n % (chunks * block_size):
        raise ValueError(f"{who} ({mode}, cp={cp}): sequence length N = {n} must be divisible by "
                         f"{'2 x ' if mode == 'zigzag' else ''}cp x block_size = {chunks * block_size}")
    return chunks


def shard_sequence(x: torch.Tensor, cp_rank: int, cp: int, *, mode: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """x: [..., N, ...] (sequence on `dim`) -> this rank's [..., N/cp, ...]."""
    chunks = check_split(x.shape[dim], cp, mode)
    parts = x.chunk(chunks, dim=dim)
    if mode == "contiguous":
        return parts[cp_rank]
    return torch.cat([parts[cp_rank], parts[2 * cp - 1 - cp_rank]], dim=dim)


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, *, mode: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of shard_sequence over `group`: every rank gets the full [..., N, ...] (no grad)."""
    cp = dist.get_world_size(group)
    x = x.detach().contiguous()
    out = x.new_empty(cp * x.shape[0], *x.shape[1:])
    with torch.no_grad():  # gloo fills `out` through views made without grad; grad mode would refuse the write
        comm.all_gather_into_tensor(out, x, group=group)  # metered, like every collective in parallel/
    pieces = out.chunk(cp, dim=0)
    if mode == "contiguous":
        return torch.cat(pieces, dim=dim)
    halves = [p.chunk(2, dim=dim) for p in pieces]
    order = [halves[r][0] for r in range(cp)] + [halves[r][1] for r in reversed(range(cp))]
    return torch.cat(order, dim=dim)


def gather_doc_ids(doc_ids, q: torch.Tensor, group, *, mode: str, who: str):
    """doc_ids: this rank's shard [B, n] of packed rows' document ids (split like q
    [B, H, n, D]), or None -> the whole row [B, N] int32 in natural order (one small
    all-gather), or None. ValueError naming `who` for a wrong shape or a non-integer dtype."""
    if doc_ids is None:
        return None
    try:
        check_doc_ids("doc_ids", doc_ids, (q.shape[0], q.shape[2]), q.device, "this rank's shard [B, n]")
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}") from None
    return gather_sequence(doc_ids.to(torch.int32), group, mode=mode)


def check_sharded_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> None:
    """The argument checks every sequence-parallel attention shares: ValueError naming what is wrong."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed {', '.join(MODES)}")
    if (q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or (q.shape[0], q.shape[2], q.shape[3])
            != (k.shape[0], k.shape[2], k.shape[3]) or q.shape[1] % k.shape[1]):
        raise ValueError(f"q must be [B, Hq, n, D] and k, v [B, Hkv, n, D] with Hkv dividing Hq, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
