"""Split a batch's sequence dimension over the context-parallel ranks, and gather it back.

A split cuts the N tokens into C equal chunks (whole attention blocks) and gives
each of the P ranks m = C / P of them, held in ascending order (`Split.chunks`):

contiguous: C = P, rank r holds chunk r -- LASP-2's natural order.
zigzag:     C = 2P, rank r holds chunks r and 2P-1-r, so every rank gets the same
            amount of causal-attention work (ring attention's load balance).
a Split:    any assignment of C = P m chunks, m per rank; parallel.balance picks one
            per batch from packed rows' document ids, where zigzag's balance breaks
            (documents skip most causal pairs, unevenly).

Every collective (ring, Ulysses, LASP-2, LASP-2H) takes the split as `mode`, the string
or a Split, and finds a chunk's global position from it alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ltrain.kernels.doc_ids import check_doc_ids

from . import comm

MODES = ("zigzag", "contiguous")


@dataclass(frozen=True)
class Split:
    """chunks[r]: the global chunk indices rank r holds, ascending (its local order);
    together a partition of range(C), the same count m on every rank. Hashable, so
    plans and index tensors derived from it are cached per split."""

    chunks: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        m = len(self.chunks[0]) if self.chunks else 0
        flat = sorted(c for r in self.chunks for c in r)
        if (not m or any(len(r) != m for r in self.chunks) or flat != list(range(len(flat)))
                or any(list(r) != sorted(r) for r in self.chunks)):
            raise ValueError(f"Split: each rank must hold the same number of chunks, ascending, together "
                             f"0..C-1 once each; got {self.chunks}")

    @property
    def cp(self) -> int:
        return len(self.chunks)

    @property
    def m(self) -> int:
        """Chunks per rank."""
        return len(self.chunks[0])

    @property
    def num_chunks(self) -> int:
        return self.cp * self.m

    def slots(self) -> list[int]:
        """The global chunk at each rank-major slot of a gather (rank s's chunks in its local order)."""
        return [c for r in self.chunks for c in r]


@functools.lru_cache(maxsize=64)
def _named_split(mode: str, cp: int) -> Split:
    if mode == "zigzag":
        return Split(tuple((r, 2 * cp - 1 - r) for r in range(cp)))
    return Split(tuple((r,) for r in range(cp)))


def chunks_per_rank(mode) -> int:
    """m of the split `mode` (1 contiguous, 2 zigzag, a Split's own); ValueError for any other mode."""
    if isinstance(mode, Split):
        return mode.m
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed {', '.join(MODES)} or a parallel.sharding.Split")
    return 2 if mode == "zigzag" else 1


def as_split(mode, cp: int) -> Split:
    """mode ("zigzag", "contiguous" or a Split of cp ranks) -> its Split; ValueError otherwise."""
    chunks_per_rank(mode)
    if isinstance(mode, Split):
        if mode.cp != cp:
            raise ValueError(f"a Split of {mode.cp} ranks used on a group of {cp}")
        return mode
    return _named_split(mode, cp)


def index_tensor(values: list, device: torch.device, dtype=torch.int64) -> torch.Tensor:
    """A small index tensor of a split's geometry on `device`. On CUDA it goes through pinned
    memory, asynchronously: a pageable copy would make the host wait on the stream, once per
    split, i.e. per batch for the documents split."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)  # bounded: a balanced split changes per batch
def slot_indices(mode, cp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the global chunk at each rank-major slot of a gather, the slot holding each global chunk)
    as index tensors on `device`, made once per split: the re-orders of a gathered or all-to-all'd
    sequence (LASP-2H, Ulysses) index with them."""
    slots = as_split(mode, cp).slots()
    return index_tensor(slots, device), index_tensor(sorted(range(len(slots)), key=slots.__getitem__), device)


def chunk_ids(rank: int, cp: int, mode) -> tuple[int, ...]:
    """Global chunk indices a rank holds, in its local order (shard_sequence's)."""
    return as_split(mode, cp).chunks[rank]


def dense_block_size(chunk_len: int) -> int:
    """Dense attention's tile over one sequence chunk (ring or LASP-2H): the largest
    power-of-two block <= 64 that divides chunk_len, so a chunk holds whole blocks."""
    bs = 64
    while chunk_len % bs:
        bs //= 2
    return bs


def check_split(n: int, cp: int, mode, block_size: int = 1, who: str = "shard_sequence") -> int:
    """The one rule of every split: N tokens cut into C = cp m chunks of whole blocks
    (m = 1 contiguous, 2 zigzag, a Split's own). Returns C; ValueError naming `who` otherwise."""
    split = as_split(mode, cp)
    chunks = split.num_chunks
    if n % (chunks * block_size):
        name = mode if isinstance(mode, str) else f"{split.m} chunks per rank"
        raise ValueError(f"{who} ({name}, cp={cp}): sequence length N = {n} must be divisible by "
                         f"{f'{split.m} x ' if split.m > 1 else ''}cp x block_size = {chunks * block_size}")
    return chunks


def shard_sequence(x: torch.Tensor, cp_rank: int, cp: int, *, mode="zigzag", dim: int = 1) -> torch.Tensor:
    """x: [..., N, ...] (sequence on `dim`) -> this rank's [..., N/cp, ...] (its chunks, ascending)."""
    check_split(x.shape[dim], cp, mode)
    parts = x.chunk(as_split(mode, cp).num_chunks, dim=dim)
    mine = chunk_ids(cp_rank, cp, mode)
    return parts[mine[0]] if len(mine) == 1 else torch.cat([parts[c] for c in mine], dim=dim)


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, *, mode="zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of shard_sequence over `group`: every rank gets the full [..., N, ...] (no grad)."""
    cp = dist.get_world_size(group)
    split = as_split(mode, cp)
    x = x.detach().contiguous()
    out = x.new_empty(cp * x.shape[0], *x.shape[1:])
    with torch.no_grad():  # gloo fills `out` through views made without grad; grad mode would refuse the write
        comm.all_gather_into_tensor(out, x, group=group)  # metered, like every collective in parallel/
    pieces = [c for p in out.chunk(cp, dim=0) for c in p.chunk(split.m, dim=dim)]  # rank-major slots
    where = {c: i for i, c in enumerate(split.slots())}
    return torch.cat([pieces[where[c]] for c in range(split.num_chunks)], dim=dim)


def gather_doc_ids(doc_ids, q: torch.Tensor, group, *, mode, who: str):
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


def check_sharded_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode) -> None:
    """The argument checks every sequence-parallel attention shares: ValueError naming what is wrong."""
    chunks_per_rank(mode)
    if (q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or (q.shape[0], q.shape[2], q.shape[3])
            != (k.shape[0], k.shape[2], k.shape[3]) or q.shape[1] % k.shape[1]):
        raise ValueError(f"q must be [B, Hq, n, D] and k, v [B, Hkv, n, D] with Hkv dividing Hq, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
