"""`infllm_v2`: InfLLM-V2 dense-sparse switchable attention (kernels/infllm_v2.py;
docs/algorithms.md#infllm-v2).

The same q, k, v projections serve both modes: dense causal attention up to
attention.infllm_v2.dense_len tokens, top-k block-sparse attention beyond,
decided on the whole sequence's length (N = n x cp) so every rank takes the
same branch. Under context parallelism the sparse mode hands the dispatcher a
per-step layout: each local query chunk selects its blocks over all keys, per
token exactly as on one device (ltrain/attention/context_parallel.py).
Each forward records the layer's mode and attended (token, block) fraction of
the whole sequence in ctx.stats: 1.0 when dense, else a 0-dim tensor that the
training loop reads at log steps (no host sync in the layer).

Packed documents (ctx.doc_ids): every token attends its own document only, in
both modes; summaries never span two documents, selection ranks only the
query's document's blocks and its init blocks are the document's first ones,
and dense_len applies to the row (one mode per step), not to each document
(kernels/infllm_v2.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ltrain.attention.context import AttnContext
from ltrain.attention.gqa import GQAttention
from ltrain.attention.registry import check_ulysses_heads, register
from ltrain.errors import ConfigError


@dataclass
class InfLLMV2Config:
    """attention.infllm_v2; defaults are MiniCPM4's public sparse_config
    (docs/algorithms.md#infllm-v2-parameters-and-defaults)."""

    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    topk: int = 64
    init_blocks: int = 1
    window_size: int = 2048
    dense_len: int = 8192
    # Normaliser of the selection scores: "exact" per-head lse, or "coarse" (estimated
    # from 4x coarser compressed keys, as MiniCPM4's public code does); kernels/infllm_v2_ref.py.
    lse: str = "exact"


def _params(section) -> dict:
    """The section (InfLLMV2Config or a DictConfig) as infllm_v2_attention's keyword arguments."""
    return asdict(section) if hasattr(section, "__dataclass_fields__") else dict(section)


def validate_section(section) -> None:
    """ConfigError naming the key, e.g. attention.infllm_v2.topk (the kernel's own parameter check)."""
    from ltrain.kernels.infllm_v2 import check_infllm_v2_params

    try:
        check_infllm_v2_params(**_params(section), prefix="attention.infllm_v2.")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg, kinds: set[str]) -> None:
    validate_section(cfg.attention.infllm_v2)
    check_ulysses_heads(cfg)


def infllm_v2_core(layer_idx: int, section):
    params = _params(section)
    select_params = {k: v for k, v in params.items() if k != "dense_len"}

    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """q: [B, Hq, n, D], k, v: [B, Hkv, n, D] (the whole sequence, or this rank's shard) -> [B, Hq, n, D]."""
        from ltrain.attention.context_parallel import softmax_attention
        from ltrain.kernels.infllm_v2 import causal_pairs, infllm_v2_attention, infllm_v2_select
        from ltrain.parallel import comm

        group = ctx.cp_group
        n_total = q.shape[2] * (1 if group is None else dist.get_world_size(group))
        sparse = n_total > params["dense_len"]
        pairs = causal_pairs(n_total, params["block_size"])  # per batch row and KV head
        # This rank's attended (token, block) pairs, 0-dim float64 tensors on q's device; whole-sequence
        # calls' fractions. Tensors throughout: the fraction is read (a host sync) only when logged.
        attended, fractions = [], []

        def full_sequence(q_h, k_h, v_h, head_start: int = 0, doc_ids=None):
            out, stats = infllm_v2_attention(q_h, k_h, v_h, **params, doc_ids=doc_ids)
            fractions.append(stats["block_fraction"])
            attended.append(stats["block_fraction"] * (q_h.shape[0] * k_h.shape[1] * pairs))
            return out

        def select(q_c, k_all, q_start: int, q_doc=None, k_doc=None):
            layout = infllm_v2_select(q_c, k_all, q_start=q_start, q_doc=q_doc, k_doc=k_doc, **select_params)
            attended.append(layout.counts.sum(dtype=torch.float64))
            return layout

        out = softmax_attention(q, k, v, ctx, full_sequence=full_sequence, block_size=params["block_size"],
                                select=select if sparse else None)
        fraction = 1.0
        if sparse and group is None:
            fraction = fractions[0]
        elif sparse:  # the whole sequence's fraction: one small all-reduce, queued like the attention's
            total = torch.stack(attended).sum()
            comm.all_reduce(total, group=group)
            fraction = total / (q.shape[0] * k.shape[1] * pairs)
        ctx.stats[f"attn/layer{layer_idx}/mode"] = "sparse" if sparse else "dense"
        ctx.stats[f"attn/layer{layer_idx}/block_fraction"] = fraction
        return out

    return core


@register("infllm_v2", "I", config=InfLLMV2Config, validate=validate,
          block_size=lambda cfg: cfg.attention.infllm_v2.block_size,
          removed={"granularity": "selection is per query token; block-granular selection let later queries "
                                  "of a block steer the earlier ones (not causal)"})
def build(layer_idx: int, model_cfg, attn_cfg) -> GQAttention:
    validate_section(attn_cfg.infllm_v2)
    return GQAttention(model_cfg, infllm_v2_core(layer_idx, attn_cfg.infllm_v2))
