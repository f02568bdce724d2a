"""The oracle of block-sparse attention: small, obviously right, slow.

For query i (global position q_start + i) and key j (global k_start + j):

    visible_ij = block of j active in i's row of the layout  and  (not causal or k_start + j <= q_start + i)
                 and (no doc ids or q_doc_i == k_doc_j)
    s_ij = sm_scale * q_i . k_j  where visible, -inf elsewhere
    lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j

and a row with no visible key has o_i = 0, lse_i = -inf. A row of the layout
is a query block (block layouts) or a query token (token layouts); the G
query heads of a KV group share their selection when the layout has fewer
heads than q. Built as the explicit [B, Hq, Nq, Nk] mask and torch SDPA, so
only for the small shapes of tests: the CPU path (block_sparse_cpu.py,
token_sparse_cpu.py) and the Triton kernels are checked against it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .layout import BlockLayout


def layout_mask(layout: BlockLayout, B: int, Hq: int, Nq: int, Nk: int, *, causal: bool = True, q_start: int = 0,
                k_start: int = 0, q_doc: Optional[torch.Tensor] = None,
                k_doc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool [B, Hq, Nq, Nk]: the layout's active blocks, (causal) key position <= query position, and
    (q_doc [B, Nq], k_doc [B, Nk] document ids given) query and key in one document."""
    m = layout.to_mask(Nq, Nk)
    m = m if m.dim() == 4 else m[None]
    m = m.expand(B, -1, -1, -1).repeat_interleave(Hq // m.shape[1], dim=1)
    if causal:
        qpos = q_start + torch.arange(Nq, device=m.device)[:, None]
        kpos = k_start + torch.arange(Nk, device=m.device)[None, :]
        m = m & (kpos <= qpos)
    if q_doc is not None:
        m = m & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return m


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     sm_scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D], mask: bool [B, Hq, Nq, Nk] -> (out, lse [B, Hq, Nq] fp32).
    Empty rows give out 0 (and no gradient) and lse -inf."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    empty = ~mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, scale=sm_scale)
    out = torch.where(empty, torch.zeros_like(out), out)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return out, torch.logsumexp(s, -1)


def block_sparse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                           causal: bool = True, sm_scale: Optional[float] = None, q_start: int = 0,
                           k_start: int = 0, q_doc: Optional[torch.Tensor] = None,
                           k_doc: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """block_sparse_attention's contract, q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D], document ids
    q_doc: [B, Nq], k_doc: [B, Nk] (or None) -> (out, lse)."""
    B, Hq, Nq, _ = q.shape
    mask = layout_mask(layout, B, Hq, Nq, k.shape[2], causal=causal, q_start=q_start, k_start=k_start,
                       q_doc=q_doc, k_doc=k_doc)
    return masked_attention(q, k, v, mask, sm_scale)
