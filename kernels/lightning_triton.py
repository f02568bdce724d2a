"""Triton lightning attention: forward and backward (Lightning Attention-2 schedule).

One program per (batch, head) walks the chunks in order, keeping the
[Dk, Dv] state in registers; the math is lightning_ref's chunked form (see
its docstring), accumulated in fp32. The backward is two kernels:

    dq kernel   forward over chunks, rebuilding S_in:
                dq_i = lambda^(i+1) S_in do_i + sum_{j<=i} lambda^(i-j) (do_i . v_j) k_j
    dkv kernel  backward over chunks, carrying dS_out (starts at d_final):
                dk_j = lambda^(L-1-j) dS_out v_j + sum_{i>=j} lambda^(i-j) (do_i . v_j) q_i
                dv_j = lambda^(L-1-j) dS_out^T k_j + sum_{i>=j} lambda^(i-j) (q_i . k_j) do_i
                dS_in = lambda^L dS_out + sum_i lambda^(i+1) q_i do_i^T   (-> d_initial)

The decay gradient (only when decay requires grad) is a third kernel in
forward mode: it carries, next to S, the tangent T = dS/dg (g = log lambda)

    T_out = lambda^L T_in + L lambda^L S_in + sum_j (L-1-j) lambda^(L-1-j) k_j v_j^T
    dg   += sum_i do_i . (lambda^(i+1) (T_in + (i+1) S_in)^T q_i)
          + sum_{j<=i} (i-j) lambda^(i-j) (q_i . k_j)(do_i . v_j)
    dg   += <d_final, T_final>

so it needs one pass and no stored states; every term is chunk-local (no
global position factors, so no fp32 cancellation at long N). The PyTorch
reference computes the same gradient in adjoint form, an independent check.
It runs only when lightning_triton_bwd is asked for decay_grad.

Inputs are made contiguous [B, H, N, D]; Dk and Dv are padded to powers of
two >= 16 by masking. The last chunk may be short (L < C).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_tiles(Q, K, V, base_qk, base_v, start, N, DK, DV, BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
    """Load one chunk of q, k [C, Dk] and v [C, Dv] as fp32 (zeros past N)."""
    rows = start + tl.arange(0, BLOCK_C)
    cols_k = tl.arange(0, BLOCK_DK)
    cols_v = tl.arange(0, BLOCK_DV)
    mask_k = (rows[:, None] < N) & (cols_k[None, :] < DK)
    mask_v = (rows[:, None] < N) & (cols_v[None, :] < DV)
    off_k = base_qk + rows[:, None] * DK + cols_k[None, :]
    off_v = base_v + rows[:, None] * DV + cols_v[None, :]
    q = tl.load(Q + off_k, mask=mask_k, other=0.0).to(tl.float32)
    k = tl.load(K + off_k, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(V + off_v, mask=mask_v, other=0.0).to(tl.float32)
    return q, k, v, off_k, mask_k, off_v, mask_v


@triton.jit
def _chunk_decays(g, start, N, BLOCK_C: tl.constexpr):
    """lambda^(i+1) [C], lambda^(L-1-j) [C] (0 past N), lambda^(i-j) masked causal [C, C], lambda^L."""
    pos = tl.arange(0, BLOCK_C)
    length = tl.minimum(N - start, BLOCK_C)
    q_decay = tl.exp(g * (pos + 1).to(tl.float32))
    # Clamp the exponent: past the chunk end lambda^(negative) would overflow.
    k_decay = tl.where(pos < length, tl.exp(g * tl.maximum(length - 1 - pos, 0).to(tl.float32)), 0.0)
    diff = pos[:, None] - pos[None, :]
    intra = tl.where(diff >= 0, tl.exp(g * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    return q_decay, k_decay, intra, tl.exp(g * length.to(tl.float32))


@triton.jit
def _state_tile(base, DK, DV, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    rows = tl.arange(0, BLOCK_DK)
    cols = tl.arange(0, BLOCK_DV)
    return base + rows[:, None] * DV + cols[None, :], (rows[:, None] < DK) & (cols[None, :] < DV)


@triton.jit
def _head_start(S, LOG_DECAY, bh, H, DK, DV, HAS_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """This program's log-decay g, and its [Dk, Dv] state tile read from S (zeros without S)."""
    g = tl.load(LOG_DECAY + bh % H)
    off_s, mask_s = _state_tile(bh * DK * DV, DK, DV, BLOCK_DK, BLOCK_DV)
    state = tl.zeros((BLOCK_DK, BLOCK_DV), dtype=tl.float32)
    if HAS_S:
        state = tl.load(S + off_s, mask=mask_s, other=0.0).to(tl.float32)
    return g, state, off_s, mask_s


@triton.jit
def _next_state(state, k, v, k_decay, chunk_decay):
    """S_out = lambda^L S_in + sum_j lambda^(L-1-j) k_j v_j^T."""
    return state * chunk_decay + tl.dot(tl.trans(k * k_decay[:, None]), v)


@triton.jit
def _fwd_kernel(Q, K, V, O, S0, SF, LOG_DECAY, H, N, DK, DV, HAS_S0: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    bh = tl.program_id(0)
    g, state, off_s, mask_s = _head_start(S0, LOG_DECAY, bh, H, DK, DV, HAS_S0, BLOCK_DK, BLOCK_DV)
    for start in range(0, N, BLOCK_C):
        q, k, v, _, _, off_v, mask_v = _chunk_tiles(Q, K, V, bh * N * DK, bh * N * DV, start, N, DK, DV,
                                                    BLOCK_C, BLOCK_DK, BLOCK_DV)
        q_decay, k_decay, intra, chunk_decay = _chunk_decays(g, start, N, BLOCK_C)
        scores = tl.dot(q, tl.trans(k)) * intra
        o = tl.dot(scores, v) + tl.dot(q * q_decay[:, None], state)
        tl.store(O + off_v, o.to(O.dtype.element_ty), mask=mask_v)
        state = _next_state(state, k, v, k_decay, chunk_decay)
    tl.store(SF + off_s, state, mask=mask_s)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, S0, LOG_DECAY, H, N, DK, DV, HAS_S0: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    bh = tl.program_id(0)
    g, state, off_s, mask_s = _head_start(S0, LOG_DECAY, bh, H, DK, DV, HAS_S0, BLOCK_DK, BLOCK_DV)
    for start in range(0, N, BLOCK_C):
        _, k, v, off_k, mask_k, off_v, mask_v = _chunk_tiles(Q, K, V, bh * N * DK, bh * N * DV, start, N, DK,
                                                             DV, BLOCK_C, BLOCK_DK, BLOCK_DV)
        do = tl.load(DO + off_v, mask=mask_v, other=0.0).to(tl.float32)
        q_decay, k_decay, intra, chunk_decay = _chunk_decays(g, start, N, BLOCK_C)
        do_v = tl.dot(do, tl.trans(v)) * intra
        dq = tl.dot(do_v, k) + tl.dot(do, tl.trans(state)) * q_decay[:, None]
        tl.store(DQ + off_k, dq.to(DQ.dtype.element_ty), mask=mask_k)
        state = _next_state(state, k, v, k_decay, chunk_decay)


@triton.jit
def _bwd_dkv_kernel(Q, K, V, DO, DK_OUT, DV_OUT, DSF, DS0, LOG_DECAY, H, N, DK, DV, n_chunks,
                    HAS_DSF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    bh = tl.program_id(0)
    g, d_state, off_s, mask_s = _head_start(DSF, LOG_DECAY, bh, H, DK, DV, HAS_DSF, BLOCK_DK, BLOCK_DV)
    for c in range(n_chunks):
        start = (n_chunks - 1 - c) * BLOCK_C
        q, k, v, off_k, mask_k, off_v, mask_v = _chunk_tiles(Q, K, V, bh * N * DK, bh * N * DV, start, N, DK,
                                                             DV, BLOCK_C, BLOCK_DK, BLOCK_DV)
        do = tl.load(DO + off_v, mask=mask_v, other=0.0).to(tl.float32)
        q_decay, k_decay, intra, chunk_decay = _chunk_decays(g, start, N, BLOCK_C)
        do_v = tl.dot(do, tl.trans(v)) * intra
        q_k = tl.dot(q, tl.trans(k)) * intra
        dk = tl.dot(tl.trans(do_v), q) + tl.dot(v, tl.trans(d_state)) * k_decay[:, None]
        dv = tl.dot(tl.trans(q_k), do) + tl.dot(k * k_decay[:, None], d_state)
        tl.store(DK_OUT + off_k, dk.to(DK_OUT.dtype.element_ty), mask=mask_k)
        tl.store(DV_OUT + off_v, dv.to(DV_OUT.dtype.element_ty), mask=mask_v)
        d_state = d_state * chunk_decay + tl.dot(tl.trans(q * q_decay[:, None]), do)
    tl.store(DS0 + off_s, d_state, mask=mask_s)


@triton.jit
def _bwd_decay_kernel(Q, K, V, DO, S0, DSF, DG, LOG_DECAY, H, N, DK, DV, HAS_S0: tl.constexpr,
                      HAS_DSF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr,
                      BLOCK_DV: tl.constexpr):
    bh = tl.program_id(0)
    g, state, off_s, mask_s = _head_start(S0, LOG_DECAY, bh, H, DK, DV, HAS_S0, BLOCK_DK, BLOCK_DV)
    tangent = tl.zeros((BLOCK_DK, BLOCK_DV), dtype=tl.float32)
    pos = tl.arange(0, BLOCK_C)
    dist = tl.maximum(pos[:, None] - pos[None, :], 0).to(tl.float32)
    dg = tl.zeros((BLOCK_C, BLOCK_DV), dtype=tl.float32)
    for start in range(0, N, BLOCK_C):
        q, k, v, _, _, off_v, mask_v = _chunk_tiles(Q, K, V, bh * N * DK, bh * N * DV, start, N, DK, DV,
                                                    BLOCK_C, BLOCK_DK, BLOCK_DV)
        do = tl.load(DO + off_v, mask=mask_v, other=0.0).to(tl.float32)
        q_decay, k_decay, intra, chunk_decay = _chunk_decays(g, start, N, BLOCK_C)
        length = tl.minimum(N - start, BLOCK_C).to(tl.float32)
        pairs = tl.dot(q, tl.trans(k)) * intra * dist
        # sum_ij pairs_ij (do_i . v_j) = sum_i do_i . (pairs @ v)_i: kept as a [C, Dv] tile, reduced once.
        from_state = tl.dot(q * (q_decay * (pos + 1).to(tl.float32))[:, None], state)
        dg += do * (tl.dot(pairs, v) + from_state + tl.dot(q * q_decay[:, None], tangent))
        k_w = k_decay * tl.maximum(length - 1 - pos.to(tl.float32), 0.0)
        tangent = tangent * chunk_decay + state * (length * chunk_decay) + tl.dot(tl.trans(k * k_w[:, None]), v)
        state = _next_state(state, k, v, k_decay, chunk_decay)
    total = tl.sum(tl.sum(dg, axis=1), axis=0)
    if HAS_DSF:
        d_final = tl.load(DSF + off_s, mask=mask_s, other=0.0).to(tl.float32)
        total += tl.sum(tl.sum(d_final * tangent, axis=1), axis=0)
    tl.store(DG + bh, total)


def _launch_args(q, v, log_decay, chunk_size):
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    g = torch.zeros(H, device=q.device) if log_decay is None else log_decay.float().contiguous()
    blocks = dict(BLOCK_C=chunk_size, BLOCK_DK=max(16, triton.next_power_of_2(Dk)),
                  BLOCK_DV=max(16, triton.next_power_of_2(Dv)))
    return (B * H,), g, (H, N, Dk, Dv), blocks


def lightning_triton_fwd(q, k, v, log_decay, initial_state, chunk_size=64):
    """q, k: [B, H, N, Dk]; v: [B, H, N, Dv] -> o [B, H, N, Dv], final state [B, H, Dk, Dv] fp32."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grid, g, dims, blocks = _launch_args(q, v, log_decay, chunk_size)
    o = torch.empty_like(v, dtype=q.dtype)
    final = torch.empty(*q.shape[:2], q.shape[-1], v.shape[-1], device=q.device, dtype=torch.float32)
    s0 = final if initial_state is None else initial_state.contiguous()
    _fwd_kernel[grid](q, k, v, o, s0, final, g, *dims, HAS_S0=initial_state is not None, **blocks)
    return o, final


def lightning_triton_bwd(q, k, v, log_decay, initial_state, do, d_final, chunk_size=64, decay_grad=False):
    """Gradients dq, dk, dv (input dtypes), d_initial [B, H, Dk, Dv] fp32, and with decay_grad
    the gradient with respect to log_decay ([H] fp32, summed over the batch; one more kernel), else None."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    grid, g, dims, blocks = _launch_args(q, v, log_decay, chunk_size)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_init = torch.empty(*q.shape[:2], q.shape[-1], v.shape[-1], device=q.device, dtype=torch.float32)
    s0 = d_init if initial_state is None else initial_state.contiguous()
    dsf = d_init if d_final is None else d_final.contiguous()
    _bwd_dq_kernel[grid](q, k, v, do, dq, s0, g, *dims, HAS_S0=initial_state is not None, **blocks)
    _bwd_dkv_kernel[grid](q, k, v, do, dk, dv, dsf, d_init, g, *dims, triton.cdiv(q.shape[2], chunk_size),
                          HAS_DSF=d_final is not None, **blocks)
    d_log_decay = None
    if decay_grad:
        dg = torch.empty(grid[0], device=q.device, dtype=torch.float32)
        _bwd_decay_kernel[grid](q, k, v, do, s0, dsf, dg, g, *dims, HAS_S0=initial_state is not None,
                                HAS_DSF=d_final is not None, **blocks)
        d_log_decay = dg.view(q.shape[0], q.shape[1]).sum(0)
    return dq, dk, dv, d_init, d_log_decay
