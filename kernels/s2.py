"""S2-Attention layout (sparsely-sharded heads), as served by vLLM for Phi-3-small.

For query block i, key block j <= i and head h of H heads:

    local:    i - j < local_blocks
    vertical: (j + h * head_sliding_step + head_sliding_offset) % vert_stride == 0,
              head_sliding_step = max(1, vert_stride // H)   (h = 0 for every head if homo_head)
    active iff local or vertical

Each head sees a different shard of the distant context; together the heads
cover all of it when H * head_sliding_step >= vert_stride.
"""

from __future__ import annotations

import warnings

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


def s2_layout(num_heads: int, seq_len: int, *, block_size: int = 64, local_blocks: int = 16, vert_stride: int = 8,
              homo_head: bool = False, head_sliding_offset: int = 1, num_dense_heads: int = 0,
              device=None) -> BlockLayout:
    """S2 layout for seq_len tokens: BlockLayout with counts [1, H, M] and
    indices [1, H, M, max_active], M = seq_len / block_size; H = num_heads
    query heads (Hl = Hq), or Hl = 1 when homo_head and no dense heads (every
    head then shares one pattern, which lets GQA heads share gathered blocks).

    Defaults are vLLM's / Phi-3-small's (block_size 64, local_blocks 16,
    vert_stride 8, head_sliding_offset 1; DKernel's own default offset is 0).
    Warns when the union over heads does not cover every causal block pair.
    """
    if seq_len % block_size:
        raise ValueError(f"seq_len={seq_len} is not divisible by block_size={block_size}: pad the sequence to a multiple of block_size")
    if num_heads < 1 or local_blocks < 1 or vert_stride < 1:
        raise ValueError(f"num_heads, local_blocks and vert_stride must be >= 1, got {num_heads}, {local_blocks}, {vert_stride}")
    if not 0 <= num_dense_heads <= num_heads:
        raise ValueError(f"num_dense_heads must be in [0, num_heads={num_heads}], got {num_dense_heads}")
    num_blocks = seq_len // block_size
    pattern_heads = 1 if homo_head else num_heads
    head_sliding_step = max(1, vert_stride // num_heads)
    if num_dense_heads == 0 and num_blocks > local_blocks and pattern_heads * head_sliding_step < vert_stride:
        warnings.warn(
            f"s2_layout: {pattern_heads} distinct head pattern(s) x head_sliding_step {head_sliding_step} < "
            f"vert_stride {vert_stride}, so the union over heads does not cover every causal block pair: "
            "distant context beyond local_blocks is partly invisible to every head. Use more heads, a smaller "
            "vert_stride, homo_head=False or num_dense_heads > 0.",
            stacklevel=2,
        )
    heads = 1 if homo_head and num_dense_heads == 0 else num_heads
    mask = s2_block_mask(heads, num_blocks, local_blocks=local_blocks, vert_stride=vert_stride, homo_head=homo_head,
                         head_sliding_offset=head_sliding_offset, num_dense_heads=num_dense_heads, device=device)
    return BlockLayout.from_block_mask(mask[None])
