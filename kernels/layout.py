"""Block-sparsity layout: which key blocks each query block attends to.

A layout is data, not code (docs/architecture.md#contracts): S2 builds one once from its
parameters, InfLLM-V2 builds one per step from top-k scores, and a single
block-sparse kernel serves both.

Storage is CSR-like, per (batch, head, row):

    counts:  int32 [Bl, Hl, Mq]            number of active key blocks
    indices: int32 [Bl, Hl, Mq, max_active] active key blocks, ascending,
                                            padded with -1 after counts

A row is a query block (a block layout: S2, dense) or a query token (a token
layout, Mq = Nq: InfLLM-V2's per-token top-k, whose rows then hold one
selection per token that the KV group's query heads share).

Bl is 1 (shared over the batch) or B. Hl is 1 (all heads), Hkv (one selection
per GQA group, as InfLLM-V2 needs) or Hq (one per query head, as S2 needs).
Block indices are local to the q/k tensors handed to the kernel; causality is
not part of the layout (the kernel applies it from global token offsets), so
a block above the diagonal may be listed and simply contributes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class BlockLayout:
    counts: torch.Tensor
    indices: torch.Tensor
    num_k_blocks: int

    def __post_init__(self):
        if self.counts.dim() != 3 or self.indices.dim() != 4:
            raise ValueError(
                "BlockLayout: counts must be [Bl, Hl, Mq] and indices [Bl, Hl, Mq, max_active], "
                f"got counts {tuple(self.counts.shape)} and indices {tuple(self.indices.shape)}"
            )
        if self.indices.shape[:3] != self.counts.shape:
            raise ValueError(
                f"BlockLayout: indices {tuple(self.indices.shape)} does not extend counts {tuple(self.counts.shape)}"
            )
        if self.counts.dtype != torch.int32 or self.indices.dtype != torch.int32:
            raise ValueError("BlockLayout: counts and indices must be int32")

    # ---- constructors -------------------------------------------------

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, max_active: int | None = None) -> BlockLayout:
        """block_mask: bool [Bl, Hl, Mq, Mk] -> layout, built with torch ops on its device.

        max_active (optional) fixes the padded width so a per-step caller
        avoids the host sync of `counts.max()`; it must be >= every count.
        """
        if block_mask.dim() != 4 or block_mask.dtype != torch.bool:
            raise ValueError(f"block_mask must be bool [Bl, Hl, Mq, Mk], got {block_mask.dtype} {tuple(block_mask.shape)}")
        mk = block_mask.shape[-1]
        ar = torch.arange(mk, device=block_mask.device, dtype=torch.int32)
        # Inactive blocks get keys >= mk so one sort puts active blocks first, ascending.
        keys = torch.where(block_mask, ar, ar + mk).sort(dim=-1).values
        counts = block_mask.sum(-1, dtype=torch.int32)
        width = int(counts.max()) if max_active is None else max_active
        keys = keys[..., :width]
        indices = torch.where(keys < mk, keys, -1).to(torch.int32)
        return cls(counts, indices.contiguous(), mk)

    @classmethod
    def from_indices(cls, indices: torch.Tensor, num_k_blocks: int) -> BlockLayout:
        """indices: int [Bl, Hl, Mq, K], distinct active key blocks in any order,
        -1 (or any negative) for unused slots, e.g. a top-k selection with
        out-of-range picks masked. Sorted and compacted on device; no host sync."""
        if indices.dim() != 4:
            raise ValueError(f"indices must be [Bl, Hl, Mq, K], got {tuple(indices.shape)}")
        idx = indices.to(torch.int32)
        idx = torch.where((idx >= 0) & (idx < num_k_blocks), idx, num_k_blocks).sort(dim=-1).values
        counts = (idx < num_k_blocks).sum(-1, dtype=torch.int32)
        return cls(counts, torch.where(idx < num_k_blocks, idx, -1).contiguous(), num_k_blocks)

    @classmethod
    def full(cls, num_q_blocks: int, num_k_blocks: int, device=None) -> BlockLayout:
        """Every key block for every query block (dense attention; the kernel's
        causal rule still applies)."""
        mask = torch.ones(1, 1, num_q_blocks, num_k_blocks, dtype=torch.bool, device=device)
        return cls.from_block_mask(mask)

    @classmethod
    def causal(cls, num_q_blocks: int, num_k_blocks: int, device=None) -> BlockLayout:
        """Key blocks j <= i for query block i (q and k aligned at block 0):
        dense causal attention without visiting blocks above the diagonal."""
        mask = torch.ones(num_q_blocks, num_k_blocks, dtype=torch.bool, device=device).tril()
        return cls.from_block_mask(mask[None, None])

    # ---- properties ---------------------------------------------------

    @property
    def num_q_blocks(self) -> int:
        return self.counts.shape[2]

    @property
    def max_active(self) -> int:
        return self.indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def to(self, device) -> BlockLayout:
        return BlockLayout(self.counts.to(device), self.indices.to(device), self.num_k_blocks)

    def block_mask(self) -> torch.Tensor:
        """bool [Bl, Hl, Mq, Mk]."""
        bl, hl, mq, _ = self.indices.shape
        # Padding (-1) scatters into an extra column that is dropped.
        mask = torch.zeros(bl, hl, mq, self.num_k_blocks + 1, dtype=torch.bool, device=self.device)
        idx = torch.where(self.indices >= 0, self.indices, self.num_k_blocks).long()
        mask.scatter_(-1, idx, True)
        return mask[..., : self.num_k_blocks]

    def to_mask(self, nq: int, nk: int) -> torch.Tensor:
        """Token-level bool mask [Hl, nq, nk], or [Bl, Hl, nq, nk] when Bl > 1,
        of a block layout (rows tile nq like the key blocks tile nk) or a token
        layout (one row per query token). For tests and debugging only: it is nq x nk."""
        if nk % self.num_k_blocks or nq % self.num_q_blocks:
            raise ValueError(f"to_mask: ({nq}, {nk}) tokens do not tile {self.num_q_blocks} x {self.num_k_blocks} rows x blocks")
        bs, rows = nk // self.num_k_blocks, nq // self.num_q_blocks
        if rows not in (1, bs):
            raise ValueError(f"to_mask: {self.num_q_blocks} rows over {nq} queries are neither blocks of {bs} nor tokens")
        mask = self.block_mask().repeat_interleave(rows, dim=2).repeat_interleave(bs, dim=3)
        return mask[0] if mask.shape[0] == 1 else mask

    def density(self) -> float:
        """Fraction of all (query block, key block) pairs that are active."""
        return self.counts.sum().item() / (self.counts.numel() * self.num_k_blocks)

    def causal_density(self) -> float:
        """Fraction of the causal (query block, key block) pairs (j <= i, q and k
        aligned at block 0) that are active: the attended-block fraction a
        kind reports, where density() counts all pairs. One host sync."""
        m = self.num_q_blocks
        causal = torch.ones(m, self.num_k_blocks, dtype=torch.bool, device=self.device).tril()
        bl, hl, _ = self.counts.shape
        return (self.block_mask() & causal).sum().item() / (bl * hl * int(causal.sum()))

    def is_empty(self) -> bool:
        """True iff no block is active (one host sync); ring attention skips such
        tiles when it plans, once per cached plan."""
        return not bool(self.counts.any())

    def cached(self, key, build):
        """build(), computed once per hashable key and kept with this layout, like
        `transposed`: what follows from a static layout alone (its ring plans, its
        head slices) is paid for, host syncs included, once per layout."""
        derived = self.__dict__.setdefault("_derived", {})
        if key not in derived:
            derived[key] = build()
        return derived[key]

    def heads(self, start: int, count: int) -> BlockLayout:
        """The layout of heads [start, start + count) of a per-head layout, e.g. the
        head subset one Ulysses rank attends."""
        rows = slice(start, start + count)
        return BlockLayout(self.counts[:, rows].contiguous(), self.indices[:, rows].contiguous(), self.num_k_blocks)

    def sub(self, q_block_start: int, num_q_blocks: int, k_block_start: int, num_k_blocks: int) -> BlockLayout:
        """The layout of one (query chunk, key chunk) tile, in the tile's local
        block coordinates. Device-side, no host sync."""
        if q_block_start < 0 or q_block_start + num_q_blocks > self.num_q_blocks:
            raise ValueError(f"sub: query blocks [{q_block_start}, {q_block_start + num_q_blocks}) outside [0, {self.num_q_blocks})")
        if k_block_start < 0 or k_block_start + num_k_blocks > self.num_k_blocks:
            raise ValueError(f"sub: key blocks [{k_block_start}, {k_block_start + num_k_blocks}) outside [0, {self.num_k_blocks})")
        rows = self.indices[:, :, q_block_start : q_block_start + num_q_blocks]
        idx = torch.where(rows >= 0, rows - k_block_start, -1)  # out-of-tile blocks dropped by from_indices
        width = min(self.max_active, num_k_blocks)
        out = BlockLayout.from_indices(idx, num_k_blocks)
        return BlockLayout(out.counts, out.indices[..., :width].contiguous(), num_k_blocks)

    @cached_property
    def transposed(self) -> BlockLayout:
        """Reverse index: for each key block, the query blocks that attend to it
        ([Bl, Hl, Mk, max_q]); the Triton backward walks it for dK/dV. Cached,
        so a static layout pays for it once."""
        return BlockLayout.from_block_mask(self.block_mask().transpose(-1, -2).contiguous())
