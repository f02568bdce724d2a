"""Grouped-query softmax attention: the projections and rotary embedding every
softmax kind shares; the kind supplies only the attention core."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ltrain.attention.context import AttnContext
from ltrain.models.rope import apply_rotary

# core(q [B, Hq, N, D], k [B, Hkv, N, D], v [B, Hkv, N, D], ctx) -> [B, Hq, N, D]
Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttnContext], torch.Tensor]


class GQAttention(nn.Module):
    def __init__(self, model_cfg, core: Core):
        super().__init__()
        self.n_heads = model_cfg.n_heads
        self.n_kv_heads = model_cfg.n_kv_heads
        self.head_dim = model_cfg.dim // model_cfg.n_heads
        dim = model_cfg.dim
        self.wq = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.wo.is_residual_out = True
        self.core = core

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim]."""
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        o = self.core(q, k, v, ctx)
        return self.wo(o.transpose(1, 2).reshape(b, n, -1))

