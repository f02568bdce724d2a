"""LASP-2H: the softmax-attention layers of a hybrid model under LASP-2.

The sequence is split contiguously over the P ranks of `group`. Forward: one
all-gather of K and V (packed into one buffer), then causal softmax attention
of this rank's queries against all gathered keys, masked by global position
(key position p_k is visible to query position p_q iff p_k <= p_q). Backward:
recompute the attention (no P x N score matrix is kept between passes), then
one reduce-scatter returns to each rank the sum over ranks of dK and dV of its
own keys. dK/dV are reduced in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import comm


def _attend(q, k, v, q_start, sm_scale):
    """Causal SDPA by global position. q: [B, Hq, C, D] at q_start..; k, v: [B, Hkv, Nk, D] at 0..Nk-1."""
    C = q.shape[2]
    q_pos = torch.arange(q_start, q_start + C, device=q.device)
    k_pos = torch.arange(k.shape[2], device=q.device)
    mask = k_pos.view(1, -1) <= q_pos.view(-1, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class _LASP2H(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, q_start, sm_scale):
        k_all, v_all = all_gather_kv(k, v, group)
        # Keys past the last query position can never be attended: drop them.
        n_keys = min(q_start + q.shape[2], k_all.shape[2])
        k_all, v_all = k_all[:, :, :n_keys], v_all[:, :, :n_keys]
        ctx.save_for_backward(q, k_all, v_all)
        ctx.group, ctx.q_start, ctx.sm_scale, ctx.kv_shapes = group, q_start, sm_scale, (k.shape, v.shape)
        return _attend(q, k_all, v_all, q_start, sm_scale)

    @staticmethod
    def backward(ctx, do):
        q, k_all, v_all = ctx.saved_tensors
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k_all, v_all))
            o = _attend(q_, k_, v_, ctx.q_start, ctx.sm_scale)
            dq, dk_all, dv_all = torch.autograd.grad(o, (q_, k_, v_), do)
        dk, dv = reduce_scatter_kv(dk_all, dv_all, *ctx.kv_shapes, ctx.group)
        return dq, dk, dv, None, None, None


def all_gather_kv(k, v, group):
    """One all-gather of this rank's k, v [B, H, C, D] (packed into one buffer)
    -> k_all, v_all [B, H, P*C, D], rank-major: rank s's keys at [s C, (s+1) C)."""
    P = dist.get_world_size(group)
    packed = torch.cat([k.reshape(-1), v.reshape(-1)])
    gathered = packed.new_empty(P * packed.numel())
    comm.all_gather_into_tensor(gathered, packed, group=group)
    gathered = gathered.view(P, -1)
    return _unshard(gathered[:, : k.numel()], k.shape), _unshard(gathered[:, k.numel():], v.shape)


def reduce_scatter_kv(dk_all, dv_all, k_shape, v_shape, group):
    """Adjoint of all_gather_kv: gradients over the first Nk <= P*C gathered keys
    [B, H, Nk, D] -> this rank's dk, dv (k_shape, v_shape), summed over ranks in fp32
    by one reduce-scatter."""
    P = dist.get_world_size(group)
    packed = torch.cat([_shard(dk_all, k_shape, P), _shard(dv_all, v_shape, P)], dim=1)
    mine = packed.new_empty(packed.shape[1])
    comm.reduce_scatter_tensor(mine, packed.reshape(-1), group=group)
    dk = mine[: math.prod(k_shape)].view(k_shape).to(dk_all.dtype)
    dv = mine[math.prod(k_shape):].view(v_shape).to(dv_all.dtype)
    return dk, dv


class GatherKV(torch.autograd.Function):
    """(k, v, group) -> all_gather_kv(k, v, group), differentiable: the backward
    is reduce_scatter_kv. For callers that attend with their own kernel."""

    @staticmethod
    def forward(ctx, k, v, group):
        ctx.group, ctx.shapes = group, (k.shape, v.shape)
        return all_gather_kv(k, v, group)

    @staticmethod
    def backward(ctx, dk_all, dv_all):
        dk, dv = reduce_scatter_kv(dk_all, dv_all, *ctx.shapes, ctx.group)
        return dk, dv, None


def _unshard(flat, shape):
    """[P, B*H*C*D] rank-major chunks -> [B, H, P*C, D] in sequence order."""
    P = flat.shape[0]
    B, H, C, D = shape
    return flat.view(P, B, H, C, D).permute(1, 2, 0, 3, 4).reshape(B, H, P * C, D)


def _shard(x, shape, P):
    """[B, H, Nk, D] gradient over the first Nk <= P*C keys -> [P, B*H*C*D] fp32, zero-padded."""
    B, H, C, D = shape
    x = F.pad(x.float(), (0, 0, 0, P * C - x.shape[2]))
    return x.view(B, H, P, C, D).permute(2, 0, 1, 3, 4).reshape(P, -1)


def lasp2h_attention(q, k, v, *, group=None, q_start=None, sm_scale=None, check_shards=False):
    """Causal softmax attention over a sequence split contiguously across `group`.

    q: [B, Hq, C, D]; k, v: [B, Hkv, C, D] -- this rank's chunk, Hq a multiple
    of Hkv (GQA). Keys of rank s sit at global positions [s C, (s+1) C).
    q_start: global position of this rank's first query (default rank * C).
    sm_scale: softmax scale (default 1/sqrt(D)). check_shards: verify with one
    extra small all-gather that every rank's q, k, v have the same shape.
    Returns o: [B, Hq, C, D], o_i = softmax(q_i K^T sm_scale, keys at
    positions <= q_start + i) V.
    """
    group = group if group is not None else dist.group.WORLD
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, C, D]")
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    B, Hq, C, D = q.shape
    if k.shape[0] != B or k.shape[2] != C or k.shape[3] != D:
        raise ValueError(f"k must be [B, Hkv, C, D] = [{B}, Hkv, {C}, {D}], got {tuple(k.shape)}")
    if Hq % k.shape[1]:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({k.shape[1]})")
    if check_shards:
        comm.check_same_shape(group, q=q, k=k, v=v)
    if q_start is None:
        q_start = dist.get_rank(group) * C
    if not 0 <= q_start <= (dist.get_world_size(group) - 1) * C:
        raise ValueError(f"q_start must lie in [0, (P-1) C] = [0, {(dist.get_world_size(group) - 1) * C}], "
                         f"got {q_start}")
    return _LASP2H.apply(q, k, v, group, q_start, sm_scale)
