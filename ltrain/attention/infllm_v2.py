"""`infllm_v2`: InfLLM-V2 dense-sparse switchable attention (kernels/infllm_v2.py).

The same q, k, v projections serve both modes: dense causal attention up to
attention.infllm_v2.dense_len tokens, top-k block-sparse attention beyond.
Each forward records the layer's mode and attended-block fraction in ctx.stats.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from ltrain.attention.context import AttnContext
from ltrain.attention.gqa import GQAttention
from ltrain.attention.registry import register
from ltrain.kernels.infllm_v2 import check_infllm_v2_params, infllm_v2_attention
from ltrain.parallel.infllm_v2_cp import infllm_v2_cp_attention


def validate_infllm_v2(cfg) -> None:
    """cfg: the attention.infllm_v2 section (InfLLMV2Config or a DictConfig);
    ValueError naming the key, e.g. attention.infllm_v2.topk."""
    params = asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg)
    check_infllm_v2_params(**params, prefix="attention.infllm_v2.")


def infllm_v2_core(layer_idx: int, cfg):
    params = asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg)

    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """q: [B, Hq, N, D], k, v: [B, Hkv, N, D] -> [B, Hq, N, D]."""
        if ctx.cp_group is None:
            out, stats = infllm_v2_attention(q, k, v, **params)
        else:  # q, k, v are this rank's shard (ctx.cp_mode order); dense/sparse is decided on the full length
            out, stats = infllm_v2_cp_attention(q, k, v, group=ctx.cp_group, mode=ctx.cp_mode, cp_impl=ctx.cp_impl,
                                                **params)
        ctx.stats[f"attn/layer{layer_idx}/mode"] = stats["mode"]
        ctx.stats[f"attn/layer{layer_idx}/block_fraction"] = stats["block_fraction"]
        return out

    return core


@register("infllm_v2", "I")
def build(layer_idx: int, model_cfg, attn_cfg) -> GQAttention:
    validate_infllm_v2(attn_cfg.infllm_v2)
    return GQAttention(model_cfg, infllm_v2_core(layer_idx, attn_cfg.infllm_v2))
