"""Rotary position embedding (RoFormer), with length extension.

theta_i = 1 / base^(2i/D) for pair i of D/2; a token at position p rotates pair
i by p * theta_i. Length extension rewrites theta (equal to Hugging Face
transformers' `modeling_rope_utils`, computed here in fp64):

- `linear`: position interpolation (Chen et al. 2023), theta_i / factor.
- `ntk`: NTK-aware scaling, base -> base * factor^(D/(D-2)).
- `llama3` (Llama-3.1/3.2): with wavelength w_i = 2*pi / theta_i and the
  pretraining length L (`original_max_positions`), pairs with
  w_i < L / high_freq_factor keep theta_i, pairs with w_i > L / low_freq_factor
  get theta_i / factor, and those between blend the two,
  (1 - s) * theta_i / factor + s * theta_i with
  s = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor).
- `yarn` (Peng et al. 2023): pair index d(r) = D * ln(L / (2*pi*r)) / (2 ln base)
  is where a pair turns r times over L; below floor(d(beta_fast)) theta_i is
  kept, above ceil(d(beta_slow)) it is theta_i / factor, with a linear ramp in i
  between. cos and sin are multiplied by 0.1 * ln(factor) + 1 (transformers'
  default attention factor), which scales the logits by its square.

Positions are global, so context-parallel shards rotate exactly as the whole
sequence would.
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(
    head_dim: int, *, base: float = 10000.0, scaling: str = "none", factor: float = 1.0,
    low_freq_factor: float = 1.0, high_freq_factor: float = 4.0, original_max_positions: int = 8192,
    beta_fast: float = 32.0, beta_slow: float = 1.0, device: torch.device | None = None,
) -> tuple[torch.Tensor, float]:
    """-> (theta [head_dim/2] fp64, the factor cos and sin are multiplied by)."""
    if scaling == "ntk":
        base = base * factor ** (head_dim / (head_dim - 2))
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    inv_freq = 1.0 / pos_freqs
    if scaling == "linear":
        return inv_freq / factor, 1.0
    if scaling == "llama3":
        low_wavelen = original_max_positions / low_freq_factor
        high_wavelen = original_max_positions / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if scaling == "yarn":
        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # as transformers: no zero-width ramp
        # The ramp in fp32, as transformers computes it.
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp.to(torch.float64)
        inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + inv_freq * keep
        return inv_freq, (0.1 * math.log(factor) + 1.0) if factor > 1 else 1.0
    return inv_freq, 1.0


def rope_tables(
    positions: torch.Tensor, head_dim: int, *, base: float = 10000.0,
    scaling: str = "none", factor: float = 1.0, dtype: torch.dtype = torch.float32, **scaling_args,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, N] int -> cos, sin: [B, 1, N, head_dim/2] (broadcast over heads).
    scaling_args: rope_inv_freq's llama3 / yarn settings."""
    inv_freq, attention_factor = rope_inv_freq(
        head_dim, base=base, scaling=scaling, factor=factor, device=positions.device, **scaling_args)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # fp64 so long positions keep their phase
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, D]; rotate the (first half, second half) pairs (Llama layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
