"""What every attention layer of one forward pass shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class AttnContext:
    """positions: [B, N] global token positions of the local tokens (they differ
    from arange(N) under context parallelism); cos, sin: [B, 1, N, D/2] rotary
    tables for those positions; cp_group: the context-parallel group or None;
    cp_mode: how the sequence was split over cp_group (parallel.sharding:
    "contiguous" when the model has linear layers, for LASP-2; else "zigzag");
    cp_impl: "ring" or "ulysses" for softmax layers on a zigzag split;
    stats: per-layer numbers a kind reports to the tracker (mode, density)."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cp_group: Optional[dist.ProcessGroup] = None
    cp_mode: str = "contiguous"
    cp_impl: str = "ring"
    stats: dict = field(default_factory=dict)
