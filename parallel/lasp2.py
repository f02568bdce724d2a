"""LASP-2: sequence parallelism for linear attention with one all-gather of states.

The sequence is split contiguously over the P ranks of `group`; rank r holds
chunk r of length C. With lambda the per-head decay (1 without decay) and
0-based positions i, j inside the chunk:

forward
    M_r      = sum_j lambda^(C-1-j) k_j v_j^T                  memory state [B, H, Dk, Dv]
    all-gather M_0 .. M_{P-1}                                    (one collective)
    prefix_r = sum_{s<r} lambda^(C (r-1-s)) M_s                 state entering chunk r
    o        = lightning_attention(q, k, v, initial_state=prefix_r)   (intra + inter)

backward
    dS_r     = sum_i lambda^(i+1) q_i do_i^T                    gradient of prefix_r
    all-gather dS_0 .. dS_{P-1}                                  (one collective)
    dM_r     = sum_{s>r} lambda^(C (s-r-1)) dS_s                gradient of M_r
    dq, dk, dv = lightning backward with initial_state=prefix_r and
                 final-state gradient dM_r (the final state's k, v terms are
                 exactly M_r's, so this adds dk_j += lambda^(C-1-j) dM_r v_j
                 and dv_j += lambda^(C-1-j) dM_r^T k_j)
    dg_r       = lightning's decay gradient with the same prefix_r and dM_r
                 (only when decay requires grad; no collective)

Why dg_r needs nothing more: prefix_{r+1} = lambda^C prefix_r + M_r is exactly
rank r's final state, so the ranks form one state chain and dM_r is the
adjoint of the link out of rank r. The lightning decay gradient of rank r's
chunk with (prefix_r fixed, dM_r on its final state) is rank r's share of
d loss / d log(lambda), and the shares sum over the group to the gradient
of the whole sequence. Each rank returns its share, like the shares of the
q/k/v projection weights; the data-parallel gradient reduction (which spans
dp x cp in ltrain) adds them.

Communication per layer and step: one all-gather of P x B x H x Dk x Dv fp32
elements in each direction, independent of the sequence length. States travel
in fp32 whatever the input dtype. Every rank joins both collectives, rank 0
(empty prefix) and rank P-1 (empty suffix) included.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ltrain.kernels.lightning import check_lightning_inputs, lightning_bwd, lightning_fwd

from . import comm


def _gather_states(state: torch.Tensor, group) -> torch.Tensor:
    """state: [B, H, Dk, Dv] fp32 -> [P, B, H, Dk, Dv], one all-gather."""
    P = dist.get_world_size(group)
    out = state.new_empty(P * state.shape[0], *state.shape[1:])
    comm.all_gather_into_tensor(out, state.contiguous(), group=group)
    return out.view(P, *state.shape)


def _decay_powers(log_decay, H, exponents):
    """[H, len(exponents)] lambda_h^e; a negative exponent marks an absent term and gives 0."""
    g = torch.zeros(H, device=exponents.device) if log_decay is None else log_decay
    return torch.where(exponents >= 0, torch.exp(g.view(H, 1) * exponents.clamp(min=0)), 0.0)


class _LASP2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, chunk_size, impl):
        _, H, C, _ = q.shape
        P, rank = dist.get_world_size(group), dist.get_rank(group)
        pos = torch.arange(C, device=q.device, dtype=torch.float32)
        k_w = _decay_powers(log_decay, H, C - 1 - pos).unsqueeze(-1)
        memory = torch.einsum("bhcd,bhce->bhde", k.float() * k_w, v.float())
        states = _gather_states(memory, group)
        s = torch.arange(P, device=q.device, dtype=torch.float32)
        prefix = torch.einsum("hs,sbhde->bhde", _decay_powers(log_decay, H, C * (rank - 1 - s)), states)
        o, _ = lightning_fwd(q, k, v, log_decay, prefix, chunk_size, impl)
        ctx.save_for_backward(q, k, v, log_decay, prefix)
        ctx.group, ctx.chunk_size, ctx.impl = group, chunk_size, impl
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, prefix = ctx.saved_tensors
        _, H, C, _ = q.shape
        P, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        pos = torch.arange(C, device=q.device, dtype=torch.float32)
        q_w = _decay_powers(log_decay, H, pos + 1).unsqueeze(-1)
        d_prefix = torch.einsum("bhcd,bhce->bhde", q.float() * q_w, do.float())
        d_states = _gather_states(d_prefix, ctx.group)
        s = torch.arange(P, device=q.device, dtype=torch.float32)
        d_memory = torch.einsum("hs,sbhde->bhde", _decay_powers(log_decay, H, C * (s - rank - 1)), d_states)
        dq, dk, dv, _, d_log_decay = lightning_bwd(q, k, v, log_decay, prefix, do, d_memory, ctx.chunk_size,
                                                   ctx.impl, decay_grad=ctx.needs_input_grad[3])
        return dq, dk, dv, d_log_decay, None, None, None


def lasp2_linear_attention(q, k, v, decay=None, group=None, *, chunk_size=64, impl="auto",
                           check_shards=False):
    """Causal linear attention over a sequence split contiguously across `group`.

    q, k: [B, H, C, Dk]; v: [B, H, C, Dv] -- this rank's chunk (rank r holds
    global positions [r C, (r+1) C)); decay: [H] in (0, 1] or None, the same
    on every rank. Returns o: [B, H, C, Dv], equal to this rank's slice of
    lightning_attention on the full sequence. Gradients flow to q, k, v, and to
    decay when it requires grad: decay.grad is this rank's share, and its sum
    over the group is the full-sequence gradient (as for any weight shared by
    the ranks of a sequence-parallel group).
    check_shards: also verify (one extra small all-gather) that every rank
    holds a chunk of the same shape; off on the hot path because the config
    layer already checks that the sequence divides across cp ranks.
    """
    log_decay = check_lightning_inputs(q, k, v, decay, chunk_size=chunk_size)
    group = group if group is not None else dist.group.WORLD
    if check_shards:
        comm.check_same_shape(group, q=q, k=k, v=v)
    return _LASP2.apply(q, k, v, log_decay, group, chunk_size, impl)
