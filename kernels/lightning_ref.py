"""PyTorch reference for lightning attention (causal linear attention with decay).

Recurrence (per batch b and head h, token t included, 1-based t):

    S_t = lambda_h * S_{t-1} + k_t v_t^T        S_0 = initial_state   [Dk, Dv]
    o_t = q_t^T S_t                                                   [Dv]

Chunked form used here and in the Triton kernel (chunk of length L, local
0-based positions i, j; S_in is the state entering the chunk):

    o_i   = lambda^(i+1) q_i^T S_in + sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j
    S_out = lambda^L S_in + sum_j lambda^(L-1-j) k_j v_j^T

Packed documents (doc_ids [B, N], non-decreasing per row): the state resets
at every document start, S_t = k_t v_t^T + [doc_t = doc_{t-1}] lambda S_{t-1},
with doc_{-1} = initial_doc (None: the first document continues S_0). With
p the document of the token before the chunk and d_last its last token's, the
chunked form above only gains masks, which _doc_masks folds into the decays:

    lambda^(i+1)    x [d_i = p]          a query reads S_in only inside p's document
    lambda^(i-j)    x [d_i = d_j]        intra-chunk pairs of one document
    lambda^(L-1-j)  x [d_j = d_last]     S_out holds the chunk's last document only
    lambda^L        x [d_last = p]       S_in survives a chunk with no document start

(equalities suffice because ids are non-decreasing: d_i = d_j with j <= i means
no document starts in (j, i]). The backward and the decay gradient are the same
formulas with the same masked decays.

All arithmetic is fp32; the log-decay g_h = log(lambda_h) is passed so that
lambda^x = exp(g x) never overflows (g <= 0). `log_decay=None` means lambda = 1.
The decay gradient is taken with respect to g (dL/dlambda = dL/dg / lambda).
Every chunk is processed at once (batched matmuls); only the [Dk, Dv] state
recurrence over chunks is a Python loop, so memory is O(N C + N/C Dk Dv),
never N x N.
"""

from __future__ import annotations

import torch


def _chunked(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, n_chunks, C, D] in fp32, zero-padded at the end. Everything after
    is fp32, like the Triton kernels: the chunk states are sums over the whole prefix, the intra
    chunk matmuls sums over C tokens, and the decay-gradient terms products of them."""
    B, H, N, D = x.shape
    n_chunks = -(-N // chunk_size)
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, n_chunks * chunk_size - N))
    return x.view(B, H, n_chunks, chunk_size, D)


def _decays(log_decay, H, N, chunk_size, device):
    """Decay factors for every chunk, with the last chunk's true length.

    Returns (q_decay [H, 1, C, 1] = lambda^(i+1), k_decay [H, n, C, 1] =
    lambda^(L_c-1-j) (0 on padding), intra [H, 1, C, C] = lambda^(i-j) for j<=i
    else 0, chunk_decay [H, n] = lambda^(L_c), lens [n] = L_c).
    """
    g = torch.zeros(H, device=device) if log_decay is None else log_decay.float().to(device)
    g = g.view(H, 1, 1)
    n_chunks = -(-N // chunk_size)
    pos = torch.arange(chunk_size, device=device, dtype=torch.float32)
    lens = torch.full((n_chunks,), float(chunk_size), device=device)
    lens[-1] = N - (n_chunks - 1) * chunk_size
    q_decay = torch.exp(g * (pos + 1)).unsqueeze(-1)
    # Clamp before exp: padded positions would give lambda^(negative) = inf, and inf * 0 = nan.
    k_exp = (lens.view(-1, 1) - 1 - pos).clamp(min=0)
    k_decay = torch.exp(g * k_exp) * (pos < lens.view(-1, 1)).float()
    diff = pos.view(-1, 1) - pos.view(1, -1)
    intra = torch.where(diff >= 0, torch.exp(g * diff.clamp(min=0)), 0.0)
    chunk_decay = torch.exp(g.view(H, 1) * lens)
    return q_decay, k_decay.unsqueeze(-1), intra.unsqueeze(1), chunk_decay, lens


def _doc_masks(doc_ids, initial_doc, chunk_size):
    """Document masks of every chunk (docstring of this module), shaped to multiply _decays'
    factors: (q_mask [B, 1, n, C, 1] = [d_i = p], k_mask [B, 1, n, C, 1] = [d_j = d_last],
    same [B, 1, n, C, C] = [d_i = d_j], carry [B, 1, n] = [d_last = p]) as fp32.

    doc_ids: [B, N] ints; initial_doc: [B] or None (the first document continues S_0). The
    padding repeats each row's last id, so d_last of the last chunk is its last real token's.
    """
    B, N = doc_ids.shape
    n_chunks = -(-N // chunk_size)
    doc = torch.cat([doc_ids, doc_ids[:, -1:].expand(B, n_chunks * chunk_size - N)], dim=1)
    doc = doc.view(B, n_chunks, chunk_size)
    first = doc_ids[:, 0] if initial_doc is None else initial_doc.to(doc_ids.device)
    prev = torch.cat([first.to(doc.dtype).view(B, 1), doc[:, :-1, -1]], dim=1)  # [B, n]: p of each chunk
    last = doc[:, :, -1]
    q_mask = (doc == prev.unsqueeze(-1)).float().view(B, 1, n_chunks, chunk_size, 1)
    k_mask = (doc == last.unsqueeze(-1)).float().view(B, 1, n_chunks, chunk_size, 1)
    same = (doc.unsqueeze(-1) == doc.unsqueeze(-2)).float().unsqueeze(1)
    return q_mask, k_mask, same, (last == prev).float().unsqueeze(1)


def _masked_decays(log_decay, H, N, chunk_size, device, doc_ids, initial_doc):
    """_decays, with doc_ids the document masks multiplied in (batch dimension added: q_decay,
    k_decay [B, H, n, C, 1], intra [B, H, n, C, C], chunk_decay [B, H, n])."""
    q_decay, k_decay, intra, chunk_decay, lens = _decays(log_decay, H, N, chunk_size, device)
    if doc_ids is None:
        return q_decay, k_decay, intra, chunk_decay, lens
    q_mask, k_mask, same, carry = _doc_masks(doc_ids, initial_doc, chunk_size)
    return q_decay * q_mask, k_decay * k_mask, intra * same, chunk_decay * carry, lens


def _states_in(kc, vc, k_decay, chunk_decay, initial_state):
    """State entering each chunk: [B, H, n, Dk, Dv], and the final state."""
    B, H, n, C, Dk = kc.shape
    Dv = vc.shape[-1]
    memory = torch.einsum("bhncd,bhnce->bhnde", kc * k_decay, vc)
    # fp32 (kc is fp32): the state accumulates every earlier chunk, over the whole sequence.
    state = kc.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.float()
    states = []
    for c in range(n):
        states.append(state)
        state = chunk_decay[..., c, None, None] * state + memory[:, :, c]
    return torch.stack(states, dim=2), state


def _state_grads_out(qc, doc, q_decay, chunk_decay, d_final):
    """Gradient reaching each chunk's outgoing state [B, H, n, Dk, Dv], and d_initial.

    Reverse recurrence dS_in = lambda^L dS_out + sum_i lambda^(i+1) q_i do_i^T,
    starting from d_final (zeros when None) at the last chunk.
    """
    B, H, n, _, Dk = qc.shape
    q_do = torch.einsum("bhncd,bhnce->bhnde", qc * q_decay, doc)
    d_state = qc.new_zeros(B, H, Dk, doc.shape[-1]) if d_final is None else d_final.float()  # fp32, as _states_in
    d_out = [None] * n
    for c in reversed(range(n)):
        d_out[c] = d_state
        d_state = chunk_decay[..., c, None, None] * d_state + q_do[:, :, c]
    return torch.stack(d_out, dim=2), d_state


def lightning_ref_fwd(q, k, v, log_decay=None, initial_state=None, chunk_size=64, doc_ids=None, initial_doc=None):
    """Chunked forward.

    q, k: [B, H, N, Dk]; v: [B, H, N, Dv]; log_decay: [H] or None;
    initial_state: [B, H, Dk, Dv] or None; doc_ids: [B, N] or None;
    initial_doc: [B] or None (the document initial_state belongs to).
    Returns o: [B, H, N, Dv] (dtype of q) and final state [B, H, Dk, Dv] (fp32).
    """
    B, H, N, _ = q.shape
    qc, kc, vc = (_chunked(x, chunk_size) for x in (q, k, v))
    q_decay, k_decay, intra, chunk_decay, _ = _masked_decays(log_decay, H, N, chunk_size, q.device, doc_ids,
                                                             initial_doc)
    s_in, final = _states_in(kc, vc, k_decay, chunk_decay, initial_state)
    scores = (qc @ kc.transpose(-1, -2)) * intra
    o = scores @ vc + (qc * q_decay) @ s_in
    return o.flatten(2, 3)[:, :, :N].to(q.dtype), final


def lightning_ref_bwd(q, k, v, log_decay, initial_state, do, d_final, chunk_size=64, decay_grad=False,
                      doc_ids=None, initial_doc=None):
    """Chunked backward of `lightning_ref_fwd`.

    With dS_out the gradient reaching a chunk's outgoing state (d_final for the
    last chunk) and dS_in = lambda^L dS_out + sum_i lambda^(i+1) q_i do_i^T:

        dq_i = lambda^(i+1) S_in do_i + sum_{j<=i} lambda^(i-j) (do_i . v_j) k_j
        dk_j = lambda^(L-1-j) dS_out v_j + sum_{i>=j} lambda^(i-j) (do_i . v_j) q_i
        dv_j = lambda^(L-1-j) dS_out^T k_j + sum_{i>=j} lambda^(i-j) (q_i . k_j) do_i

    Returns dq, dk, dv (dtypes of q, k, v), d_initial [B, H, Dk, Dv] (fp32)
    and, with decay_grad, the gradient with respect to log_decay ([H] fp32,
    see _log_decay_grad), else None.
    """
    N = q.shape[2]
    qc, kc, vc, doc = (_chunked(x, chunk_size) for x in (q, k, v, do))
    q_decay, k_decay, intra, chunk_decay, lens = _masked_decays(log_decay, q.shape[1], N, chunk_size, q.device,
                                                                doc_ids, initial_doc)
    s_in, _ = _states_in(kc, vc, k_decay, chunk_decay, initial_state)
    ds_out, d_state = _state_grads_out(qc, doc, q_decay, chunk_decay, d_final)

    do_dot_v = doc @ vc.transpose(-1, -2)
    do_v = do_dot_v * intra
    q_k = (qc @ kc.transpose(-1, -2)) * intra
    dq_state = (doc @ s_in.transpose(-1, -2)) * q_decay
    dk_state = (vc @ ds_out.transpose(-1, -2)) * k_decay
    dq = do_v @ kc + dq_state
    dk = do_v.transpose(-1, -2) @ qc + dk_state
    dv = q_k.transpose(-1, -2) @ doc + (kc * k_decay) @ ds_out
    d_log_decay = None
    if decay_grad:
        d_log_decay = _log_decay_grad(qc, kc, q_k, do_dot_v, dq_state, dk_state, s_in, ds_out, chunk_decay, lens)

    def unchunk(x, like):
        return x.flatten(2, 3)[:, :, :N].to(like.dtype)

    return unchunk(dq, q), unchunk(dk, k), unchunk(dv, v), d_state, d_log_decay


def _log_decay_grad(qc, kc, q_k, do_dot_v, dq_state, dk_state, s_in, ds_out, chunk_decay, lens):
    """Gradient of the loss with respect to g_h = log(lambda_h): [H] fp32, summed over the batch.

    Adjoint form, per chunk of length L with S_in / dS_out as in lightning_ref_bwd:

        dg = sum_{j<=i} (i-j) lambda^(i-j) (q_i . k_j)(do_i . v_j)     intra-chunk pairs
           + sum_i (i+1) lambda^(i+1) q_i . (S_in do_i)                output <- S_in
           + sum_j (L-1-j) lambda^(L-1-j) k_j . (dS_out v_j)           S_out <- k_j v_j^T
           + L lambda^L <dS_out, S_in>                                  S_out <- S_in

    The backward's own terms supply the products: q_k = lambda^(i-j) q_i . k_j,
    do_dot_v = do_i . v_j, and the state parts of dq and dk (dq_state_i =
    lambda^(i+1) S_in do_i, dk_state_j = lambda^(L-1-j) dS_out v_j), so only
    elementwise work is added. Each pair of tokens (t, s) enters with its
    distance t - s split into chunk-local pieces. The textbook identity dg =
    sum_t t (q_t . dq_t - k_t . dk_t) weighs terms by global positions that
    then cancel, so its fp32 error grows with N (100x this form's on a
    lambda = 0.9 head at N = 4096, see tests/kernels/test_lightning_ref.py);
    no term here grows with the position. With documents the masked
    decays already zero every term that crosses a document start.
    """
    C = qc.shape[3]
    pos = torch.arange(C, device=qc.device, dtype=torch.float32)
    dist = (pos.view(-1, 1) - pos.view(1, -1)).clamp(min=0)
    pairs = q_k * do_dot_v * dist
    from_state = qc * dq_state * (pos + 1).view(-1, 1)
    to_state = kc * dk_state * (lens.view(-1, 1) - 1 - pos).clamp(min=0).unsqueeze(-1)
    carry = (ds_out * s_in).sum((-1, -2)) * (chunk_decay * lens)
    return sum(t.sum(dims) for t, dims in [(pairs, (0, 2, 3, 4)), (from_state, (0, 2, 3, 4)),
                                            (to_state, (0, 2, 3, 4)), (carry, (0, 2))])


def lightning_recurrent(q, k, v, decay=None, initial_state=None, doc_ids=None, initial_doc=None):
    """Token-by-token recurrence: the oracle for the chunked forms (slow, autograd).

    q, k: [B, H, N, Dk]; v: [B, H, N, Dv]; decay: [H] or None; doc_ids: [B, N]
    or None: S_t = k_t v_t^T + [doc_t = doc_{t-1}] lambda S_{t-1}, doc_{-1} =
    initial_doc ([B]; None: the first document continues initial_state).
    Returns o: [B, H, N, Dv] and the final state [B, H, Dk, Dv], both in at
    least fp32 (fp64 inputs stay fp64).
    """
    B, H, N, Dk = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    lam = torch.ones(H, dtype=dtype, device=q.device) if decay is None else decay.to(dtype)
    lam = lam.view(1, H, 1, 1)
    state = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    prev = None if doc_ids is None else (doc_ids[:, 0] if initial_doc is None else initial_doc)
    outs = []
    for t in range(N):
        carry = lam
        if doc_ids is not None:  # a document start forgets the state
            carry = lam * (doc_ids[:, t] == prev).to(dtype).view(B, 1, 1, 1)
            prev = doc_ids[:, t]
        state = carry * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
    return torch.stack(outs, dim=2), state
