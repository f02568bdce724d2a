"""`linear`: lightning attention (causal linear attention with per-head decay).

Follows the TransNormerLLM / lightning-attention line:
    q' = silu(q), k' = silu(k)                (feature map, no softmax)
    S_t = lambda_h S_{t-1} + k'_t v_t^T,  o_t = q'_t^T S_t
    out = W_o RMSNorm_head(o)                 (a norm replaces the softmax denominator)
with lambda_h = exp(-(8 h / H) * (1 - l / L)) for head h = 1..H of layer
l = 0..L-1 (TransNormerLLM's decay schedule: steep decay on low layers and
heads). Counting layers from 0 leaves the last layer a mild decay,
exp(-8 h / (H L)) (0.61 .. 0.14 over the heads of a 4-layer model), where
counting from 1 would give it none. Linear layers take no rotary embedding: the decay carries
position. K/V heads are shared across a GQA group by repetition, since the
state S is kept per query head.

With learn_decay the schedule is only the initialisation: each head learns
its rate r_h = exp(a_h) > 0, lambda_h = exp(-r_h) (the A_log parametrisation
of Mamba), so that every optimiser step keeps lambda_h in (0, 1).

Packed documents (ctx.doc_ids): the state resets at every document start, so
no token reads an earlier document (kernels/lightning.py, parallel/lasp2.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ltrain.attention.context import AttnContext
from ltrain.attention.gqa import Projections
from ltrain.attention.registry import register
from ltrain.errors import config_error
from ltrain.nn.layers import RMSNorm


@dataclass
class LinearConfig:
    """attention.linear: lightning (linear) attention layers."""

    decay: bool = True  # per-head decay lambda_h (TransNormerLLM); False: plain causal linear attention
    learn_decay: bool = False  # train lambda_h (initialised from the schedule); needs decay
    chunk_size: int = 64


def validate(cfg, kinds: set[str]) -> None:
    lin = cfg.attention.linear
    if lin.chunk_size < 16 or lin.chunk_size & (lin.chunk_size - 1):
        raise config_error("attention.linear.chunk_size", lin.chunk_size, "must be a power of two >= 16")
    if lin.learn_decay and not lin.decay:
        raise config_error("attention.linear.learn_decay", True,
                           "needs attention.linear.decay=true (there is no decay to learn)")


def transnormer_decay(n_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """lambda_h for h = 1..H, layer l = layer_idx of L: [H] in (0, 1]."""
    h = torch.arange(1, n_heads + 1, dtype=torch.float64)
    return torch.exp(-(8 * h / n_heads) * (1 - layer_idx / n_layers)).float()


class LinearAttention(Projections):
    def __init__(self, layer_idx: int, model_cfg, linear_cfg):
        super().__init__(model_cfg)
        self.out_norm = RMSNorm(self.head_dim, model_cfg.norm_eps)
        self.chunk_size = linear_cfg.chunk_size
        decay = transnormer_decay(self.n_heads, layer_idx, model_cfg.n_layers) if linear_cfg.decay else None
        self.layer_idx = layer_idx
        if linear_cfg.learn_decay:
            self.decay_log_rate = torch.nn.Parameter(torch.log(-torch.log(decay)))
        else:  # a constant of the layer, not a weight: not trained, not in the checkpoint
            self.register_buffer("fixed_decay", decay, persistent=False)
        # silu(q).silu(k) grows with head_dim like q.k does; scale as softmax attention would.
        self.scale = 1.0 / math.sqrt(self.head_dim)

    @property
    def decay(self) -> torch.Tensor | None:
        """lambda_h: [H] in (0, 1], or None without decay."""
        if hasattr(self, "decay_log_rate"):
            # Rates above 80 would round lambda to 0 in fp32 (outside (0, 1]); lambda = e^-80 already forgets.
            return torch.exp(-self.decay_log_rate.float().exp().clamp(max=80.0))
        return self.fixed_decay

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim]."""
        q, k, v = self.qkv(x)
        group = self.n_heads // self.n_kv_heads
        q, k = F.silu(q) * self.scale, F.silu(k)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        decay = self.decay
        if decay is not None and decay.requires_grad:  # where the learned decays are, for the tracker
            ctx.stats[f"attn/layer{self.layer_idx}/decay_mean"] = decay.detach().mean()
            ctx.stats[f"attn/layer{self.layer_idx}/decay_min"] = decay.detach().min()
        # Kernels and collectives load when a layer runs, not when the config reads this module.
        from ltrain.kernels.lightning import lightning_attention
        from ltrain.parallel.lasp2 import lasp2_linear_attention

        if ctx.cp_group is None:
            o = lightning_attention(q, k, v, decay=decay, chunk_size=self.chunk_size, doc_ids=ctx.doc_ids)
        else:  # two zigzag chunks per rank, one state all-gather each way
            o = lasp2_linear_attention(q, k, v, decay, ctx.cp_group, chunk_size=self.chunk_size, mode=ctx.cp_mode,
                                       doc_ids=ctx.doc_ids)
        return self.out(self.out_norm(o))


@register("linear", "L", config=LinearConfig, validate=validate, softmax=False)
def build(layer_idx: int, model_cfg, attn_cfg) -> LinearAttention:
    return LinearAttention(layer_idx, model_cfg, attn_cfg.linear)
