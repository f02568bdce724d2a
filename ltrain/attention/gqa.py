"""Grouped-query softmax attention: the projections and rotary embedding every
softmax kind shares; the kind supplies only the attention core."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ltrain.attention.context import AttnContext
from ltrain.nn.rope import apply_rotary

# core(q [B, Hq, N, D], k [B, Hkv, N, D], v [B, Hkv, N, D], ctx) -> [B, Hq, N, D]
Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttnContext], torch.Tensor]


class Projections(nn.Module):
    """W_q, W_k, W_v with n_heads / n_kv_heads heads, and W_o back to the model width."""

    def __init__(self, model_cfg):
        super().__init__()
        self.n_heads = model_cfg.n_heads
        self.n_kv_heads = model_cfg.n_kv_heads
        self.head_dim = model_cfg.dim // model_cfg.n_heads
        dim = model_cfg.dim
        bias = model_cfg.qkv_bias  # Qwen2-style q/k/v biases
        self.wq = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.wo.is_residual_out = True

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, N, dim] -> q [B, Hq, N, D], k, v [B, Hkv, N, D]."""
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """o: [B, Hq, N, D] -> [B, N, dim]."""
        b, _, n, _ = o.shape
        return self.wo(o.transpose(1, 2).reshape(b, n, -1))


class GQAttention(Projections):
    def __init__(self, model_cfg, core: Core):
        super().__init__(model_cfg)
        self.core = core

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim]."""
        q, k, v = self.qkv(x)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        return self.out(self.core(q, k, v, ctx))
