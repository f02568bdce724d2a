"""Llama-style decoder whose layers each use the attention kind the config names.

embedding -> n_layers x [x + attn(norm(x)), x + mlp(norm(x))] -> norm -> head
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ltrain.attention.context import AttnContext
from ltrain.attention.registry import build_attention, is_hybrid, resolve_layer_kinds
from ltrain.nn.layers import RMSNorm, SwiGLU, swiglu_hidden
from ltrain.nn.rope import rope_tables


class Block(nn.Module):
    def __init__(self, layer_idx: int, kind: str, model_cfg, attn_cfg):
        super().__init__()
        self.kind = kind
        self.attn_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.attn = build_attention(kind, layer_idx, model_cfg, attn_cfg)
        self.mlp_norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.mlp = SwiGLU(model_cfg.dim, swiglu_hidden(model_cfg.dim, model_cfg.ffn_dim, model_cfg.multiple_of))

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, model_cfg, attn_cfg):
        super().__init__()
        self.cfg = model_cfg
        self.kinds = resolve_layer_kinds(attn_cfg.pattern, attn_cfg.layers, model_cfg.n_layers)
        self.embed = nn.Embedding(model_cfg.vocab_size, model_cfg.dim)
        self.layers = nn.ModuleList(
            Block(i, kind, model_cfg, attn_cfg) for i, kind in enumerate(self.kinds)
        )
        self.norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.head = None if model_cfg.tie_embeddings else nn.Linear(model_cfg.dim, model_cfg.vocab_size, bias=False)
        self.attn_stats: dict = {}
        # One split for every layer: zigzag balances causal softmax work (ring), and LASP-2 /
        # LASP-2H take it as two chunks per rank in the same single state all-gather.
        self.cp_mode = "zigzag"
        self.hybrid = is_hybrid(self.kinds)  # its dense layers take LASP-2H under cp
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "is_residual_out", False) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if getattr(module, "bias", None) is not None:  # q/k/v biases (model.qkv_bias) start at 0
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
        cp_group: Optional[dist.ProcessGroup] = None, cp_impl: str = "ring", output: Optional[Callable] = None,
        doc_ids: Optional[torch.Tensor] = None, cp_split=None,
    ):
        """input_ids: [B, N] -> logits [B, N, vocab]; positions: [B, N] global positions
        (default arange(N); under context parallelism the shard's own positions,
        split as `self.cp_mode` says, or this batch's `cp_split`: a
        parallel.sharding.Split, ltrain.train.shard_batch's balanced one). doc_ids: [B, N] document ids of packed
        rows (non-decreasing per row, split like input_ids; ltrain.data.loader),
        so every layer attends within a token's own document only; positions
        then restart at 0 in each document. None: one document per row.
        output: instead of the logits, return
        output(x, weight) of the final norm's output x [B, N, dim] and the output
        projection weight [vocab, dim] (ltrain.loss.chunked_lm_loss: the loss
        without the logits); called here, where ZeRO-3 has the weight gathered."""
        b, n = input_ids.shape
        if positions is None:
            positions = torch.arange(n, device=input_ids.device).expand(b, n)
        head_dim = self.cfg.dim // self.cfg.n_heads
        c = self.cfg
        cos, sin = rope_tables(
            positions, head_dim, base=c.rope_base, scaling=c.rope_scaling, factor=c.rope_factor,
            low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
            original_max_positions=c.rope_original_max_positions, beta_fast=c.rope_beta_fast,
            beta_slow=c.rope_beta_slow,
        )
        ctx = AttnContext(cos=cos, sin=sin, cp_group=cp_group,
                          cp_mode=self.cp_mode if cp_split is None else cp_split, cp_impl=cp_impl, hybrid=self.hybrid, doc_ids=doc_ids)
        x = self.embed(input_ids)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        x = self.norm(x)
        self.attn_stats = ctx.stats
        if output is not None:
            return output(x, self.embed.weight if self.head is None else self.head.weight)
        return self.head(x) if self.head is not None else x @ self.embed.weight.t()
