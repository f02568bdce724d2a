"""S2-Attention layout (sparsely-sharded heads), as served by vLLM for Phi-3-small.

For query block i, key block j <= i and head h of H heads:

    local:    i - j < local_blocks
    vertical: (j + h * head_sliding_step + head_sliding_offset) % vert_stride == 0,
              head_sliding_step = max(1, vert_stride // H)   (h = 0 for every head if homo_head)
    active iff local or vertical

Coverage. The vertical rule does not depend on i: head h keeps, beyond the
local band, exactly the key blocks j = -(h * head_sliding_step +
head_sliding_offset) mod vert_stride (one residue class per head). The union
over heads therefore reaches every causal block pair iff those residues take
all vert_stride values, i.e. iff the number of distinct head patterns (H, or
1 with homo_head) is >= vert_stride, or some head is dense (num_dense_heads
> 0). With H < vert_stride the step vert_stride // H is > 1 and the heads
hit only multiples of it: H = 4, vert_stride = 8 (step 2) leaves every even
key block beyond the local band unseen by all heads, although H * step ==
vert_stride (counting H * step, as an earlier version of this module did, is
not the criterion). Such a layout drops that context once sequences reach
past the local band. `s2_uncovered` / `s2_coverage` measure coverage from the
block mask itself (mask.any(heads) against the causal mask), and `s2_layout`
warns exactly when the layout it builds misses a causal pair.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Tuple

import torch

from .layout import BlockLayout


def s2_block_mask(num_heads: int, num_blocks: int, *, local_blocks: int = 16, vert_stride: int = 8,
                  homo_head: bool = False, head_sliding_offset: int = 1, num_dense_heads: int = 0,
                  device=None) -> torch.Tensor:
    """bool [H, num_blocks, num_blocks] (causal at block level). The last
    num_dense_heads heads are dense (every block j <= i), as in DKernel; the
    sparse heads keep their own h in the vertical rule, so a model's sparse
    heads see the same pattern whatever num_dense_heads is."""
    head_sliding_step = max(1, vert_stride // num_heads)
    i = torch.arange(num_blocks, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    h = torch.zeros(num_heads, 1, 1, dtype=torch.long, device=device) if homo_head else \
        torch.arange(num_heads, device=device)[:, None, None]
    local = (i - j) < local_blocks
    vertical = (j + h * head_sliding_step + head_sliding_offset) % vert_stride == 0
    mask = (local | vertical) & (j <= i)
    if num_dense_heads:
        mask[num_heads - num_dense_heads:] = j <= i
    return mask



class S2Coverage(NamedTuple):
    """How much of the causal block triangle the union over heads reaches."""

    uncovered: int                         # causal block pairs (j <= i) that no head attends
    causal: int                            # causal block pairs in all, M (M + 1) / 2
    example: Optional[Tuple[int, int]]     # (query block, key block) of the first uncovered pair (row-major)

    @property
    def covered(self) -> bool:
        return self.uncovered == 0

    @property
    def fraction(self) -> float:
        return self.uncovered / self.causal if self.causal else 0.0


def s2_uncovered(mask: torch.Tensor) -> torch.Tensor:
    """bool [M, M]: the causal block pairs (j <= i) that no head of the block
    mask [H, M, M] attends (causal & ~mask.any(heads)). Any layout that keeps
    the local band can only miss pairs beyond it."""
    if mask.dim() != 3 or mask.shape[1] != mask.shape[2]:
        raise ValueError(f"s2_uncovered: expected a block mask [H, M, M], got shape {tuple(mask.shape)}")
    m = mask.shape[-1]
    causal = torch.ones(m, m, dtype=torch.bool, device=mask.device).tril()
    return causal & ~mask.bool().any(0)


def s2_coverage(mask: torch.Tensor) -> S2Coverage:
    """Coverage of the causal block pairs by the block mask [H, M, M], counted
    from the mask itself (see s2_uncovered)."""
    uncovered = s2_uncovered(mask)
    m = mask.shape[-1]
    count = int(uncovered.sum())
    example = None
    if count:
        i, j = uncovered.nonzero()[0].tolist()
        example = (i, j)
    return S2Coverage(count, m * (m + 1) // 2, example)


def s2_pattern_coverage(num_heads: int, num_blocks: Optional[int] = None, *, local_blocks: int = 16,
                        vert_stride: int = 8, homo_head: bool = False, head_sliding_offset: int = 1,
                        num_dense_heads: int = 0) -> S2Coverage:
    """Coverage of the S2 block mask of these parameters over num_blocks
    blocks. The default, local_blocks + vert_stride, is the shortest length
    whose distant part (key blocks beyond the local band of the last query
    block) holds every residue mod vert_stride: since the vertical rule does
    not depend on the query block, the pattern drops context at some sequence
    length iff it does at this one."""
    if num_blocks is None:
        num_blocks = local_blocks + vert_stride
    return s2_coverage(s2_block_mask(num_heads, num_blocks, local_blocks=local_blocks, vert_stride=vert_stride,
                                     homo_head=homo_head, head_sliding_offset=head_sliding_offset,
                                     num_dense_heads=num_dense_heads))


def s2_layout(num_heads: int, seq_len: int, *, block_size: int = 64, local_blocks: int = 16, vert_stride: int = 8,
              homo_head: bool = False, head_sliding_offset: int = 1, num_dense_heads: int = 0,
              device=None) -> BlockLayout:
    """S2 layout for seq_len tokens: BlockLayout with counts [1, H, M] and
    indices [1, H, M, max_active], M = seq_len / block_size; H = num_heads
    query heads (Hl = Hq), or Hl = 1 when homo_head and no dense heads (every
    head then shares one pattern, which lets GQA heads share gathered blocks).

    Defaults are vLLM's / Phi-3-small's (block_size 64, local_blocks 16,
    vert_stride 8, head_sliding_offset 1; DKernel's own default offset is 0).
    Warns (UserWarning) exactly when the union over heads of the mask built
    here misses some causal block pair, i.e. when context beyond the local
    band is dropped at this seq_len (see the module docstring and s2_coverage).
    """
    if seq_len % block_size:
        raise ValueError(f"seq_len={seq_len} is not divisible by block_size={block_size}: pad the sequence to a multiple of block_size")
    if num_heads < 1 or local_blocks < 1 or vert_stride < 1:
        raise ValueError(f"num_heads, local_blocks and vert_stride must be >= 1, got {num_heads}, {local_blocks}, {vert_stride}")
    if not 0 <= num_dense_heads <= num_heads:
        raise ValueError(f"num_dense_heads must be in [0, num_heads={num_heads}], got {num_dense_heads}")
    num_blocks = seq_len // block_size
    heads = 1 if homo_head and num_dense_heads == 0 else num_heads
    mask = s2_block_mask(heads, num_blocks, local_blocks=local_blocks, vert_stride=vert_stride, homo_head=homo_head,
                         head_sliding_offset=head_sliding_offset, num_dense_heads=num_dense_heads, device=device)
    coverage = s2_coverage(mask)
    if not coverage.covered:
        patterns = 1 if homo_head else num_heads
        i, j = coverage.example
        if not homo_head:
            more = f"num_heads >= {vert_stride}"
        elif num_heads >= vert_stride:
            more = "homo_head=False"
        else:
            more = f"num_heads >= {vert_stride} with homo_head=False"
        warnings.warn(
            f"s2_layout: no head attends {coverage.uncovered} of {coverage.causal} causal block pairs "
            f"({coverage.fraction:.1%}) beyond the local band of {local_blocks} blocks at seq_len {seq_len}, "
            f"e.g. query block {i} -> key block {j}: that context is dropped. {patterns} distinct head "
            f"pattern(s) (num_heads={num_heads}, homo_head={homo_head}) < vert_stride={vert_stride}; need "
            f">= vert_stride distinct patterns ({more}), a smaller vert_stride (<= {patterns}), "
            "or num_dense_heads > 0.",
            stacklevel=2,
        )
    return BlockLayout.from_block_mask(mask[None])
