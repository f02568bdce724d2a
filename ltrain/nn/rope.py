"""Rotary position embedding (RoFormer), with length extension.

theta_i = base^(-2i/D); a token at position p rotates pair i by p * theta_i.
Length extension: `linear` is position interpolation (p -> p / factor, Chen et
al. 2023); `ntk` is NTK-aware scaling (base -> base * factor^(D/(D-2))).
Positions are global, so context-parallel shards rotate exactly as the whole
sequence would.
"""

from __future__ import annotations

import torch


def rope_tables(
    positions: torch.Tensor, head_dim: int, *, base: float = 10000.0,
    scaling: str = "none", factor: float = 1.0, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, N] int -> cos, sin: [B, 1, N, head_dim/2] (broadcast over heads)."""
    if scaling == "ntk":
        base = base * factor ** (head_dim / (head_dim - 2))
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    pos = positions.to(torch.float64)
    if scaling == "linear":
        pos = pos / factor
    angles = pos[..., None] * inv_freq  # fp64 so long positions keep their phase
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, D]; rotate the (first half, second half) pairs (Llama layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
