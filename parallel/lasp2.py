"""LASP-2: sequence parallelism for linear attention with one all-gather of states.

The sequence is cut into G chunks of length C over the P ranks of `group`:

contiguous  G = P,  rank r holds chunk r;
zigzag      G = 2P, rank r holds chunks r and 2P-1-r, in that order in its
            local tensor (parallel.sharding.shard_sequence), the split ring
            attention balances causal work with;
a Split     G = P m, any m chunks per rank, ascending (parallel.balance's
            per-batch split for packed documents).

All are one code path: a rank holds m = G / P chunks, and every
formula below runs over GLOBAL chunk indices c, s in [0, G). With lambda the
per-head decay (1 without decay) and 0-based positions i, j inside a chunk:

forward
    M_c      = sum_j lambda^(C-1-j) k_j v_j^T                  memory state of chunk c [B, H, Dk, Dv]
    all-gather the m states of every rank: M_0 .. M_{G-1}       (one collective, asynchronous)
      meanwhile  o_intra = lightning_attention(q_c, k_c, v_c)   per chunk, from a zero state
    prefix_c = sum_{s<c} lambda^(C (c-1-s)) M_s                 state entering chunk c
    o_i      = o_intra_i + lambda^(i+1) q_i^T prefix_c          (the inter-chunk part)

backward
    dS_c     = sum_i lambda^(i+1) q_i do_i^T                    gradient of prefix_c
    all-gather dS_0 .. dS_{G-1}                                  (one collective, asynchronous)
      meanwhile  dq, dk, dv, dg = lightning backward per chunk with initial_state=prefix_c
                 and no final-state gradient
    dM_c     = sum_{s>c} lambda^(C (s-c-1)) dS_s                gradient of M_c
    then the terms of M_c = S_final - lambda^C prefix_c:
    dk_j    += lambda^(C-1-j) dM_c v_j,   dv_j += lambda^(C-1-j) dM_c^T k_j
    dg      += <dM_c, C lambda^C prefix_c + sum_j (C-1-j) lambda^(C-1-j) k_j v_j^T>
               (only when decay requires grad; dg is summed over this rank's
               chunks; no collective)

So the collective of each pass runs behind the kernel it was designed to hide
behind (LASP-2's overlap of the state exchange with the intra-chunk part).

In zigzag the successors of rank r's chunk r include its own chunk 2P-1-r (and
its predecessors include chunk r): the sums above are over global chunk
indices, so a rank's own states enter its prefix / suffix like anyone else's.
A rank's m chunks run as m batch rows of one lightning call, so the kernel is
called once per pass in either mode.

Why dg needs nothing more: prefix_{c+1} = lambda^C prefix_c + M_c is exactly
chunk c's final state, so the G chunks form one state chain and dM_c is the
adjoint of the link out of chunk c. The lightning decay gradient of chunk c
with prefix_c fixed, plus dM_c paired with d(final state)/d log(lambda), is
chunk c's share of d loss / d log(lambda), and the shares sum over the chunks
to the gradient of the whole sequence. Each rank returns the sum of its
chunks' shares, like the shares of the q/k/v projection weights; the
data-parallel gradient reduction (which spans dp x cp in ltrain) adds them.

Packed documents (doc_ids, this rank's shard [B, n] of non-decreasing ids):
the state resets at every document start (kernels/lightning.py), so a prefix
stops at the last document start before its chunk. With e_s the id of chunk
s's last token and p_c = e_{c-1} that of the token before chunk c:

    M_c      = sum_j [d_j = e_c] lambda^(C-1-j) k_j v_j^T        the chunk's last document only
    prefix_c = sum_{s<c, e_s = p_c} lambda^(C (c-1-s)) M_s
    o_i      = o_intra_i + [d_i = p_c] lambda^(i+1) q_i^T prefix_c

(o_intra from lightning_fwd with the chunk's ids). e_s = p_c holds exactly
when no chunk strictly between s and c starts a document (ids are
non-decreasing): the prefix combine (A then B) = B if B's chunk holds a
document start, else lambda^(len B) A + B. The only per-chunk information
another rank needs is e_s, one id per batch row, so each rank appends its m x
B ids to its states: still one all-gather, B ids longer per chunk (moved as
int32 bits). The backward is the same chain transposed: dS_c = sum_i
[d_i = p_c] lambda^(i+1) q_i do_i^T, dM_c sums the dS_s with s > c, e_c =
p_s, lightning_bwd runs with initial_doc = p_c, and the terms of M_c and the
decay tangent take the masks of M_c's sum (the link's lambda^C prefix_c term
counts only where chunk c holds no document start, e_c = p_c).

Communication per layer and step: one all-gather of P x m x B x H x Dk x Dv
fp32 elements in each direction (m = 1 contiguous, 2 zigzag: still one
collective each way, since a rank sends its m states as one [m, B, H, Dk, Dv]
buffer), independent of the sequence length (with doc_ids the forward's is
P x m x B ids longer). States travel in fp32 whatever the input dtype. Every
rank joins both collectives, whether its prefix or suffix is empty
(contiguous rank 0 and rank P-1) or not.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ltrain.kernels.lightning import check_lightning_inputs, lightning_bwd, lightning_fwd

from . import comm
from .sharding import as_split, chunk_ids, chunks_per_rank, index_tensor


def check_mode(mode, n: int | None = None) -> int:
    """Validate the split `mode` and (unless None) this rank's local length n;
    return m, the number of chunks a rank holds (1 contiguous, 2 zigzag, a Split's m)."""
    m = chunks_per_rank(mode)
    if n is not None and m > 1 and (n % m or n == 0):
        what = "(global chunks r and 2P-1-r)" if mode == "zigzag" else "(its Split's chunks)"
        raise ValueError(f"mode={mode if isinstance(mode, str) else 'Split'!r} needs this rank's local length to be "
                         f"{m} equal chunks {what}, got local length {n}")
    return m


def _fold(x, m):
    """[B, H, m*C, D] (this rank's m chunks, local order) -> [m*B, H, C, D], chunk-major
    batch rows. A view when m = 1."""
    B, H, N, D = x.shape
    return x.unflatten(2, (m, N // m)).permute(2, 0, 1, 3, 4).reshape(m * B, H, N // m, D)


def _unfold(x, m):
    """Inverse of _fold: [m*B, H, C, D] -> [B, H, m*C, D]."""
    mB, H, C, D = x.shape
    return x.view(m, mB // m, H, C, D).permute(1, 2, 0, 3, 4).reshape(mB // m, H, m * C, D)


def _fold_docs(doc_ids, m):
    """[B, m*C] ids (this rank's m chunks) -> [m*B, C] int32, _fold's batch rows."""
    B, n = doc_ids.shape
    return doc_ids.to(torch.int32).view(B, m, n // m).transpose(0, 1).reshape(m * B, n // m)


def _gather_states(states: torch.Tensor, m: int, group, last_docs=None):
    """states: [m*B, H, Dk, Dv] fp32, this rank's m chunk states (chunk-major)
    -> ([P*m, B, H, Dk, Dv] rank-major (slot s*m + a: rank s's a-th chunk), the gathered
    last_docs [P*m, B] int32 or None, the collective's work handle): one all-gather, started
    asynchronously; read the results after work.wait().

    last_docs: [m*B] int32, the id of each chunk's last token, or None. They ride in the
    same collective: each chunk's slab is its state's fp32 bits then its B ids, moved as
    int32 (a bit copy: the ids never pass through a float type)."""
    P = dist.get_world_size(group)
    mB = states.shape[0]
    if last_docs is None:
        out = states.new_empty(P * mB, *states.shape[1:])
        work = comm.all_gather_into_tensor(out, states.contiguous(), group=group, async_op=True)
        return out.view(P * m, mB // m, *states.shape[1:]), None, work
    send = torch.cat([states.reshape(m, -1).view(torch.int32), last_docs.view(m, -1)], dim=1)
    out = send.new_empty(P * m, send.shape[1])
    work = comm.all_gather_into_tensor(out, send, group=group, async_op=True)
    n_state = send.shape[1] - mB // m
    gathered = out[:, :n_state].view(torch.float32).unflatten(1, (mB // m, *states.shape[1:]))
    return gathered, out[:, n_state:], work


def _decay_powers(log_decay, H, exponents):
    """[H, *exponents.shape] lambda_h^e; a negative exponent marks an absent term and gives 0."""
    g = torch.zeros(H, device=exponents.device) if log_decay is None else log_decay
    g = g.view(H, *([1] * exponents.dim()))
    return torch.where(exponents >= 0, torch.exp(g * exponents.clamp(min=0)), 0.0)


@functools.lru_cache(maxsize=64)  # bounded: a balanced split changes per batch
def _chunk_geometry(P, rank, mode, device):
    """(this rank's global chunk ids [m], global chunk id of each gathered slot [P*m]) as fp32,
    and the slot holding each chunk's predecessor [P*m] (chunk 0: itself, it has no prefix),
    made once per (P, rank, mode, device): a host-to-device copy per step would stall the host."""
    ids = as_split(mode, P).slots()
    mine = index_tensor(list(chunk_ids(rank, P, mode)), device, torch.float32)
    slots = index_tensor(ids, device, torch.float32)
    pred = index_tensor([ids.index(max(c - 1, 0)) for c in ids], device)
    return mine, slots, pred


def _geometry(group, mode, device):
    return _chunk_geometry(dist.get_world_size(group), dist.get_rank(group), mode, device)


def _combine(log_decay, H, C, exponents, states, links=None):
    """sum_s lambda^(C e[a, s]) states[s] for each local chunk a (terms with e < 0 absent,
    and with links [B, m, S] those where links is False) -> [m*B, H, Dk, Dv]."""
    w = _decay_powers(log_decay, H, C * exponents)
    if links is None:
        out = torch.einsum("has,sbhde->abhde", w, states)
    else:
        out = torch.einsum("bhas,sbhde->abhde", w * links.unsqueeze(1), states)
    return out.flatten(0, 1)


def _doc_links(gathered_last, pred, rank, m):
    """The document masks of rank `rank`'s chunks from the gathered last ids e [P*m, B] and
    _chunk_geometry's pred: (p [m*B], the id of the token before each local chunk; forward
    links [B, m, S]: slot s reaches local chunk a's prefix (e_s = p_a); backward links
    [B, m, S]: local chunk a's M reaches slot s's prefix (e_a = p_s)). _combine's exponents
    keep only the slots before (forward) / after (backward) the local chunk."""
    slot_prev = gathered_last[pred]  # [S, B]: p of every slot's chunk
    mine = slice(rank * m, (rank + 1) * m)
    prev, last = slot_prev[mine], gathered_last[mine]  # [m, B]
    forward = gathered_last.T.unsqueeze(1) == prev.T.unsqueeze(2)
    backward = slot_prev.T.unsqueeze(1) == last.T.unsqueeze(2)
    return prev.reshape(-1), forward, backward


def _token_masks(docs, prev):
    """Per token of each local chunk, [m*B, 1, C, 1] fp32: [d_i = p] (the queries that read the
    prefix; None when prev is) and [d_j = e] (the keys in M); (None, None) without docs."""
    if docs is None:
        return None, None
    shape = (docs.shape[0], 1, docs.shape[1], 1)
    reads = None if prev is None else (docs == prev.unsqueeze(1)).float().view(shape)
    return reads, (docs == docs[:, -1:]).float().view(shape)


def _masked(w, mask):
    return w if mask is None else w * mask


class _LASP2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, chunk_size, impl, mode, doc_ids):
        m = check_mode(mode, q.shape[2])
        qf, kf, vf = (_fold(t, m) for t in (q, k, v))
        docs = None if doc_ids is None else _fold_docs(doc_ids, m)
        _, H, C, _ = qf.shape
        pos = torch.arange(C, device=q.device, dtype=torch.float32)
        _, k_doc = _token_masks(docs, None)
        k_w = _masked(_decay_powers(log_decay, H, C - 1 - pos).unsqueeze(-1), k_doc)
        # States, their all-gather and the prefix sums (_combine) are fp32 whatever q's dtype: a
        # state sums a chunk's C tokens, a prefix up to G - 1 states (the chain grows with cp), and
        # half-precision states would round at every link. The inter-chunk term is added to the
        # kernel's intra-chunk output in fp32; that output arrives rounded to q.dtype (lightning_fwd's
        # dtype), so cp > 1 adds one rounding in all, not one per rank (precision_scaling-cpu.md).
        memory = torch.einsum("bhcd,bhce->bhde", kf.float() * k_w, vf.float())
        states, gathered_last, work = _gather_states(memory, m, group, None if docs is None else docs[:, -1])
        o, _ = lightning_fwd(qf, kf, vf, log_decay, None, chunk_size, impl, docs)
        work.wait()
        mine, slots, pred = _geometry(group, mode, q.device)
        prev = links = back_links = None
        if docs is not None:
            prev, links, back_links = _doc_links(gathered_last, pred, dist.get_rank(group), m)
        prefix = _combine(log_decay, H, C, mine.view(-1, 1) - 1 - slots.view(1, -1), states, links)
        q_w = _masked(_decay_powers(log_decay, H, pos + 1).unsqueeze(-1), _token_masks(docs, prev)[0])
        o = (qf.float() @ prefix).mul_(q_w).add_(o).to(o.dtype)
        ctx.save_for_backward(q, k, v, log_decay, prefix, docs, prev, back_links)
        ctx.group, ctx.chunk_size, ctx.impl, ctx.mode, ctx.m = group, chunk_size, impl, mode, m
        return _unfold(o, m)

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, prefix, docs, prev, back_links = ctx.saved_tensors
        m = ctx.m
        qf, kf, vf, dof = (_fold(t, m) for t in (q, k, v, do))
        _, H, C, _ = qf.shape
        pos = torch.arange(C, device=q.device, dtype=torch.float32)
        q_doc, k_doc = _token_masks(docs, prev)
        q_w = _decay_powers(log_decay, H, pos + 1).unsqueeze(-1)
        # The backward's chain likewise in fp32: dS_c, its all-gather, the suffix sums dM_c, the
        # dk/dv terms of M_c (added in fp32 to the kernel's dk/dv, which arrive in q.dtype) and the
        # decay shares.
        d_prefix = torch.einsum("bhcd,bhce->bhde", qf.float() * _masked(q_w, q_doc), dof.float())
        d_states, _, work = _gather_states(d_prefix, m, ctx.group)
        decay_grad = ctx.needs_input_grad[3]
        dq, dk, dv, _, d_log_decay = lightning_bwd(qf, kf, vf, log_decay, prefix, dof, None, ctx.chunk_size,
                                                   ctx.impl, decay_grad, docs, prev)
        work.wait()
        mine, slots, _ = _geometry(ctx.group, ctx.mode, q.device)
        d_memory = _combine(log_decay, H, C, slots.view(1, -1) - mine.view(-1, 1) - 1, d_states, back_links)
        k_w = _masked(_decay_powers(log_decay, H, C - 1 - pos).unsqueeze(-1), k_doc)
        dk = (vf.float() @ d_memory.transpose(-1, -2)).mul_(k_w).add_(dk).to(dk.dtype)
        dv = (kf.float() @ d_memory).mul_(k_w).add_(dv).to(dv.dtype)
        if decay_grad:
            # d S_final / d log(lambda) with prefix_c fixed; q_w[:, -1] = lambda^C, which carries
            # prefix_c only through a chunk without a document start (e_c = p_c).
            carried = C * q_w[:, -1:].unsqueeze(0) * prefix
            if docs is not None:
                carried = carried * (docs[:, -1] == prev).float().view(-1, 1, 1, 1)
            tangent = carried + torch.einsum("bhcd,bhce->bhde", kf.float() * k_w * (C - 1 - pos).unsqueeze(-1),
                                             vf.float())
            # fp32 (the kernel's share is fp32 too): a share sums B x Dk x Dv x chunks terms, and the
            # shares of the cp ranks are added again by the gradient reduction.
            d_log_decay = d_log_decay + (d_memory * tangent).sum((0, 2, 3))
        dq, dk, dv = (_unfold(t, m) for t in (dq, dk, dv))
        return dq, dk, dv, d_log_decay, None, None, None, None, None


def lasp2_linear_attention(q, k, v, decay=None, group=None, *, chunk_size=64, impl="auto",
                           check_shards=False, mode="contiguous", doc_ids=None):
    """Causal linear attention over a sequence split across `group`.

    q, k: [B, H, n, Dk]; v: [B, H, n, Dv] -- this rank's shard of the sequence:
    mode="contiguous": rank r holds global positions [r n, (r+1) n);
    mode="zigzag": the sequence is 2P chunks of C = n/2 and rank r holds chunk r
    then chunk 2P-1-r (parallel.sharding.shard_sequence's layout); a
    parallel.sharding.Split: its m chunks of C = n/m per rank, ascending.
    decay: [H] in (0, 1] or None, the same on every rank. Returns o: [B, H, n, Dv],
    equal to this rank's shard (same layout) of lightning_attention on the full
    sequence. Gradients flow to q, k, v, and to decay when it requires grad:
    decay.grad is this rank's share, and its sum over the group is the
    full-sequence gradient (as for any weight shared by the ranks of a
    sequence-parallel group).
    doc_ids: [B, n] integer, this rank's shard (same split as q) of the
    document ids, non-decreasing along the full row, or None: the state resets
    at every document start, exactly as lightning_attention(doc_ids=full row).
    check_shards: also verify (one extra small all-gather) that every rank
    holds a shard of the same shape; off on the hot path because the config
    layer already checks that the sequence divides across cp ranks.
    Raises ValueError for a mode not in parallel.sharding.MODES nor a Split, or a
    local length that is not m equal chunks.
    """
    check_mode(mode)
    log_decay = check_lightning_inputs(q, k, v, decay, chunk_size=chunk_size, doc_ids=doc_ids)
    check_mode(mode, q.shape[2])
    group = group if group is not None else dist.group.WORLD
    if check_shards:
        comm.check_same_shape(group, q=q, k=k, v=v)
    return _LASP2.apply(q, k, v, log_decay, group, chunk_size, impl, mode, doc_ids)
