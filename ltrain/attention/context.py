"""What every attention layer of one forward pass shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class AttnContext:
    """cos, sin: [B, 1, N, D/2] rotary tables for the local tokens' global
    positions (they differ from arange(N) under context parallelism); cp_group: the context-parallel group or None;
    cp_mode: how the sequence was split over cp_group (parallel.sharding; the
    model splits zigzag, one split for every kind);
    cp_impl: "ring" or "ulysses" for softmax layers;
    hybrid: the model has linear layers, so its dense layers use LASP-2H;
    stats: per-layer numbers a kind reports to the tracker (mode, density);
    doc_ids: [B, n] this rank's shard of the document ids (non-decreasing per row;
    a token attends only earlier tokens of its own document), None: no masking."""

    cos: torch.Tensor
    sin: torch.Tensor
    cp_group: Optional[dist.ProcessGroup] = None
    cp_mode: str = "zigzag"
    cp_impl: str = "ring"
    hybrid: bool = False
    stats: dict = field(default_factory=dict)
    doc_ids: Optional[torch.Tensor] = None
