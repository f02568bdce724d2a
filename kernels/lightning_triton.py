"""Triton lightning attention, parallel over chunks (flash-linear-attention's chunk schedule).

The math is lightning_ref's chunked form: chunk c has length L (C, the last
one possibly shorter), local 0-based positions i, j, and S_c is the state
entering it:

    o_i     = lambda^(i+1) q_i^T S_c + sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j
    S_{c+1} = lambda^L S_c + M_c,      M_c = sum_j lambda^(L-1-j) k_j v_j^T

Forward, three launches:

    _chunk_state_kernel  M_c of every (chunk, batch*head, state tile) at once
    _prefix_kernel       S_c in chunk order, in place over the M_c; elementwise, the
                         only sequential part (one program per batch*head and state tile)
    _chunk_out_kernel    o of every (chunk, batch*head, Dv tile) at once

Backward: the same two passes rebuild S_c, and run in reverse chunk order on
(q, do) they give dS_c, the gradient reaching chunk c's outgoing state:

    dS_{n-1} = d_final,   dS_{c-1} = lambda^L dS_c + sum_i lambda^(i+1) q_i do_i^T,   d_initial = dS_{-1}

then every (chunk, batch*head, tile) at once:

    _bwd_dqk_kernel  dq_i = lambda^(i+1) S_c do_i + sum_{j<=i} lambda^(i-j) (do_i . v_j) k_j
      (twice: dq, dk_j = lambda^(L-1-j) dS_c v_j + sum_{i>=j} lambda^(i-j) (do_i . v_j) q_i
       FOR_DK)
    _chunk_out_kernel, FOR_DV (the forward's launch with q, k, v, S_c read as k, q, do, dS_c):
                     dv_j = lambda^(L-1-j) dS_c^T k_j + sum_{i>=j} lambda^(i-j) (q_i . k_j) do_i

dq and dk share do . v^T but are two launches: one program holding both
accumulators spills on sm_80 and sm_90. The decay gradient (only with
decay_grad) is chunk-local given S_c and dS_c, so _bwd_dqk_kernel adds its
terms per chunk and Dk tile (summed afterwards), with g = log lambda:

    dg = sum_{j<=i} (i-j) lambda^(i-j) (q_i . k_j)(do_i . v_j) + sum_i (i+1) q_i . (lambda^(i+1) S_c do_i)
       + sum_j (L-1-j) k_j . (lambda^(L-1-j) dS_c v_j) + L lambda^L <dS_c, S_c>

No term carries a global position, so there is no fp32 cancellation at long N
(lightning_ref._log_decay_grad derives it; the tests also check it against
autograd through the token recurrence).

Packed documents (HAS_DOC, doc ids DOC [B, N] int32 and DOC_IN [B], the
document of S_0): every kernel multiplies its decay factors by
lightning_ref's document masks, with p the document of the token before the
chunk (DOC_IN for chunk 0) and d_last that of its last token:
lambda^(i+1) by [d_i = p], lambda^(i-j) by [d_i = d_j], lambda^(L-1-j) by
[d_j = d_last] and the prefix kernel's lambda^L by [d_last = p], so the chain
restarts from M_c after a chunk with a document start. The same masked factors
serve the backward and the decay gradient. HAS_DOC=False compiles to the
unmasked kernels (the doc pointers are then never read).

Inputs are made contiguous [B, H, N, D] and read as fp32 (dots run as tf32 on
GPUs); Dk and Dv are padded to powers of two >= 16 by masking and cut into
BK x BV state tiles. The states S_c and dS_c live in fp32 buffers
[B*H, n_chunks, Dk, Dv]. The kernels' chunk is min(chunk_size, 64); tiles and
warps per arch come from launch_params, which aot_specs reuses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _seq_tile(base, start, col0, N, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of rows start.. and columns col0.. of a [N, D] slice at base."""
    rows = start + tl.arange(0, BLOCK_C)
    cols = col0 + tl.arange(0, BLOCK_D)
    return base + rows[:, None] * D + cols[None, :], (rows[:, None] < N) & (cols[None, :] < D)


@triton.jit
def _load(X, offs, mask):
    # Every operand is fp32 in registers whatever the input dtype: the dots then accumulate in
    # fp32 and no intermediate (pair products, state tiles, decayed sums) is rounded to 16 bits.
    return tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _state_tile(base, row0, col0, DK, DV, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and mask of the [BK, BV] tile at (row0, col0) of a [Dk, Dv] state at base."""
    rows = row0 + tl.arange(0, BK)
    cols = col0 + tl.arange(0, BV)
    return base + rows[:, None] * DV + cols[None, :], (rows[:, None] < DK) & (cols[None, :] < DV)


@triton.jit
def _decay_vectors(g, start, N, BLOCK_C: tl.constexpr):
    """lambda^(i+1) [C], lambda^(L-1-j) [C] (0 past N), lambda^L, and L (fp32) of the chunk at start."""
    pos = tl.arange(0, BLOCK_C)
    length = tl.minimum(N - start, BLOCK_C)
    q_decay = tl.exp(g * (pos + 1).to(tl.float32))
    # Clamp the exponent: past the chunk end lambda^(negative) would overflow.
    k_decay = tl.where(pos < length, tl.exp(g * tl.maximum(length - 1 - pos, 0).to(tl.float32)), 0.0)
    return q_decay, k_decay, tl.exp(g * length.to(tl.float32)), length.to(tl.float32)


@triton.jit
def _intra_decay(g, BLOCK_C: tl.constexpr):
    """lambda^(i-j) for j <= i, else 0: [C, C]."""
    pos = tl.arange(0, BLOCK_C)
    diff = pos[:, None] - pos[None, :]
    return tl.where(diff >= 0, tl.exp(g * tl.maximum(diff, 0).to(tl.float32)), 0.0)


@triton.jit
def _doc_ends(row, doc_in, start, N, BLOCK_C: tl.constexpr):
    """(p, d_last) of the chunk at start of a doc-id row: the document of the token before
    the chunk (doc_in[0] for the first chunk) and of its last token."""
    prev = tl.where(start > 0, tl.load(row + tl.maximum(start - 1, 0)), tl.load(doc_in))
    return prev, tl.load(row + tl.minimum(start + BLOCK_C, N) - 1)


@triton.jit
def _doc_masks(DOC, DOC_IN, b, start, N, BLOCK_C: tl.constexpr):
    """Document masks of the chunk at start of row b: [d_i = p] [C], [d_j = d_last] [C],
    [d_i = d_j] [C, C] and the scalar [d_last = p] (lightning_ref._doc_masks). Positions past
    N read id 0: their k, v, do are zero and their outputs are not stored."""
    row = DOC + b.to(tl.int64) * N
    pos = start + tl.arange(0, BLOCK_C)
    doc = tl.load(row + pos, mask=pos < N, other=0)
    prev, last = _doc_ends(row, DOC_IN + b, start, N, BLOCK_C)
    return doc == prev, doc == last, doc[:, None] == doc[None, :], last == prev


@triton.jit
def _chunk_state_kernel(X, Y, STATES, LOG_DECAY, DOC, DOC_IN, H, N, DK, DV, REVERSE: tl.constexpr,
                        HAS_DOC: tl.constexpr, BLOCK_C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """STATES[bh, c] tile = sum_j w_j x_j y_j^T over chunk c: w = lambda^(L-1-j) (M_c from k, v),
    REVERSE: w = lambda^(i+1) (the chunk's share of dS_{c-1} from q, do). Grid (chunks, tiles, B*H)."""
    c, tile, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0, col0 = (tile // tl.cdiv(DV, BV)) * BK, (tile % tl.cdiv(DV, BV)) * BV
    start = c * BLOCK_C
    off_x, mask_x = _seq_tile(bh.to(tl.int64) * N * DK, start, row0, N, DK, BLOCK_C, BK)
    off_y, mask_y = _seq_tile(bh.to(tl.int64) * N * DV, start, col0, N, DV, BLOCK_C, BV)
    x, y = _load(X, off_x, mask_x), _load(Y, off_y, mask_y)
    q_decay, k_decay, _, _ = _decay_vectors(tl.load(LOG_DECAY + bh % H), start, N, BLOCK_C)
    w = q_decay if REVERSE else k_decay
    if HAS_DOC:
        q_doc, k_doc, _, _ = _doc_masks(DOC, DOC_IN, bh // H, start, N, BLOCK_C)
        w = tl.where(q_doc if REVERSE else k_doc, w, 0.0)
    state = tl.dot(tl.trans(x * w[:, None]), y)  # fp32: a sum over the chunk's tokens, stored as fp32 STATES
    off_s, mask_s = _state_tile((bh.to(tl.int64) * tl.num_programs(0) + c) * DK * DV, row0, col0, DK, DV, BK, BV)
    tl.store(STATES + off_s, state, mask=mask_s)


@triton.jit
def _prefix_kernel(STATES, S_START, S_END, LOG_DECAY, DOC, DOC_IN, H, N, DK, DV, REVERSE: tl.constexpr,
                   HAS_DOC: tl.constexpr, BLOCK_C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """In place over the chunk states: slot c <- the chain's value at chunk c, chain' = lambda^L chain + slot c.

    Forward order, from S_START (S_0): slot c becomes S_c, S_END the final state.
    REVERSE, from S_START (d_final): slot c becomes dS_c, S_END d_initial. HAS_DOC: lambda^L
    becomes 0 on a chunk with a document start. Grid (tiles, B*H)."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    row0, col0 = (tile // tl.cdiv(DV, BV)) * BK, (tile % tl.cdiv(DV, BV)) * BV
    g = tl.load(LOG_DECAY + bh % H)
    n_chunks = tl.cdiv(N, BLOCK_C)
    off, mask = _state_tile(0, row0, col0, DK, DV, BK, BV)
    head = bh.to(tl.int64) * DK * DV
    # fp32 chain: S_c (or dS_c) accumulates every earlier chunk (a sum over the whole prefix of the
    # sequence); in bf16 each of the n_chunks decay-and-add steps would round it to 8 bits.
    chain = _load(S_START + head, off, mask)
    for t in range(n_chunks):
        c = t
        if REVERSE:
            c = n_chunks - 1 - t
        slot = STATES + (bh.to(tl.int64) * n_chunks + c) * DK * DV
        contribution = _load(slot, off, mask)
        tl.store(slot + off, chain, mask=mask)
        decay = tl.exp(g * tl.minimum(N - c * BLOCK_C, BLOCK_C).to(tl.float32))
        if HAS_DOC:
            b = bh // H
            prev, last = _doc_ends(DOC + b.to(tl.int64) * N, DOC_IN + b, c * BLOCK_C, N, BLOCK_C)
            decay = tl.where(last == prev, decay, 0.0)
        chain = chain * decay + contribution
    tl.store(S_END + head + off, chain, mask=mask)


@triton.jit
def _chunk_out_kernel(A, B, X, OUT, STATES, LOG_DECAY, DOC, DOC_IN, H, N, DK, DV, FOR_DV: tl.constexpr,
                      HAS_DOC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr):
    """A chunk's Dv tile from its pair products A B^T and its state S. Grid (chunks, Dv tiles, B*H).
        forward (A, B, X, S = q, k, v, S_c):  o_i  = lambda^(i+1) (q S_c)_i + sum_j ((q k^T) * intra)_ij v_j
        FOR_DV  (A, B, X, S = k, q, do, dS_c): dv_j = lambda^(L-1-j) (k dS_c)_j + sum_i ((k q^T) * intra^T)_ji do_i
    """
    c, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = c * BLOCK_C
    g = tl.load(LOG_DECAY + bh % H)
    base_ab, base_s = bh.to(tl.int64) * N * DK, (bh.to(tl.int64) * tl.num_programs(0) + c) * DK * DV
    # fp32: both sum over the Dk tiles (static loop); rounded to OUT's dtype once, at the store.
    pairs = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    out = tl.zeros((BLOCK_C, BV), dtype=tl.float32)  # A S until the decay is applied
    for row0 in tl.static_range(0, BLOCK_DK, BK):
        off_k, mask_k = _seq_tile(base_ab, start, row0, N, DK, BLOCK_C, BK)
        a, b = _load(A, off_k, mask_k), _load(B, off_k, mask_k)
        off_s, mask_s = _state_tile(base_s, row0, iv * BV, DK, DV, BK, BV)
        pairs += tl.dot(a, tl.trans(b))
        out += tl.dot(a, _load(STATES, off_s, mask_s))
    q_decay, k_decay, _, _ = _decay_vectors(g, start, N, BLOCK_C)
    intra = _intra_decay(g, BLOCK_C)
    if HAS_DOC:  # [d_i = d_j] is symmetric: FOR_DV's transpose keeps it
        q_doc, k_doc, same, _ = _doc_masks(DOC, DOC_IN, bh // H, start, N, BLOCK_C)
        q_decay, k_decay = tl.where(q_doc, q_decay, 0.0), tl.where(k_doc, k_decay, 0.0)
        intra = tl.where(same, intra, 0.0)
    if FOR_DV:
        out = out * k_decay[:, None]
        intra = tl.trans(intra)
    else:
        out = out * q_decay[:, None]
    off_v, mask_v = _seq_tile(bh.to(tl.int64) * N * DV, start, iv * BV, N, DV, BLOCK_C, BV)
    out += tl.dot(pairs * intra, _load(X, off_v, mask_v))
    tl.store(OUT + off_v, out.to(OUT.dtype.element_ty), mask=mask_v)


@triton.jit
def _bwd_dqk_kernel(Q, K, V, DO, OUT, STATES, D_STATES, DG, LOG_DECAY, DOC, DOC_IN, H, N, DK, DV,
                    FOR_DK: tl.constexpr, DECAY_GRAD: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dq (or with FOR_DK dk) of chunk c, Dk tile into OUT; with DECAY_GRAD also this launch's
    terms of dg into DG[bh, c, tile] (dq: intra pairs, from-state and carry; dk: to-state).
    Grid (chunks, Dk tiles, B*H)."""
    c, ik, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = c * BLOCK_C
    g = tl.load(LOG_DECAY + bh % H)
    base_s = (bh.to(tl.int64) * tl.num_programs(0) + c) * DK * DV
    # fp32: do_v and acc sum over the Dv tiles; the decay-gradient shares (pairs, from/to-state,
    # carry) are sums of products of O(1) terms weighted by positions up to BLOCK_C, stored fp32 in
    # DG and summed over chunks and tiles in fp32 by the launcher (bf16 would lose them to rounding).
    do_v = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    acc = tl.zeros((BLOCK_C, BK), dtype=tl.float32)  # do S_c^T (dq) or v dS_c^T (dk), before the decay
    carry = 0.0
    for col0 in tl.static_range(0, BLOCK_DV, BV):
        off_v, mask_v = _seq_tile(bh.to(tl.int64) * N * DV, start, col0, N, DV, BLOCK_C, BV)
        v, do = _load(V, off_v, mask_v), _load(DO, off_v, mask_v)
        off_s, mask_s = _state_tile(base_s, ik * BK, col0, DK, DV, BK, BV)
        do_v += tl.dot(do, tl.trans(v))
        if FOR_DK:
            acc += tl.dot(v, tl.trans(_load(D_STATES, off_s, mask_s)))
        else:
            state = _load(STATES, off_s, mask_s)
            acc += tl.dot(do, tl.trans(state))
            if DECAY_GRAD:
                carry += tl.sum(tl.sum(state * _load(D_STATES, off_s, mask_s), axis=1), axis=0)
    q_decay, k_decay, chunk_decay, length = _decay_vectors(g, start, N, BLOCK_C)
    intra = _intra_decay(g, BLOCK_C)
    if HAS_DOC:
        q_doc, k_doc, same, keeps = _doc_masks(DOC, DOC_IN, bh // H, start, N, BLOCK_C)
        q_decay, k_decay = tl.where(q_doc, q_decay, 0.0), tl.where(k_doc, k_decay, 0.0)
        intra, chunk_decay = tl.where(same, intra, 0.0), tl.where(keeps, chunk_decay, 0.0)
    off_k, mask_k = _seq_tile(bh.to(tl.int64) * N * DK, start, ik * BK, N, DK, BLOCK_C, BK)
    q, k = _load(Q, off_k, mask_k), _load(K, off_k, mask_k)
    do_v = do_v * intra
    pos = tl.arange(0, BLOCK_C)
    if FOR_DK:
        if DECAY_GRAD:
            to_state = k * acc * (k_decay * tl.maximum(length - 1.0 - pos.to(tl.float32), 0.0))[:, None]
            tl.store(DG + (bh * tl.num_programs(0) + c) * tl.num_programs(1) + ik,
                     tl.sum(tl.sum(to_state, axis=1), axis=0))
        out = tl.dot(tl.trans(do_v), q) + acc * k_decay[:, None]
    else:
        if DECAY_GRAD:
            dist = tl.maximum(pos[:, None] - pos[None, :], 0).to(tl.float32)
            pairs = tl.dot(q, tl.trans(k)) * dist * do_v
            from_state = q * acc * (q_decay * (pos + 1).to(tl.float32))[:, None]
            tl.store(DG + (bh * tl.num_programs(0) + c) * tl.num_programs(1) + ik,
                     tl.sum(tl.sum(pairs, axis=1), axis=0) + tl.sum(tl.sum(from_state, axis=1), axis=0)
                     + carry * chunk_decay * length)
        out = tl.dot(do_v, k) + acc * q_decay[:, None]
    tl.store(OUT + off_k, out.to(OUT.dtype.element_ty), mask=mask_k)


# (BK, BV, num_warps) of the state tiles per arch and kernel: the largest that compile without
# spills for head dims 32 to 128, fp32 and bf16 inputs (benchmarks/triton_resources.py). sm_80's
# mma.sync keeps both operands in registers where sm_90's wgmma reads them from shared memory,
# so sm_80 takes narrower tiles and 8 warps. The prefix kernel is elementwise: its 32 x 32 tiles
# give the one sequential pass more programs (B = 1, H = 16, D = 128: 256).
_TILES = {
    90: {"lightning_chunk_state": (64, 64, 4), "lightning_prefix": (32, 32, 4), "lightning_chunk_out": (64, 64, 4),
         "lightning_bwd_dqk": (64, 64, 4)},
    80: {"lightning_chunk_state": (64, 64, 4), "lightning_prefix": (32, 32, 4), "lightning_chunk_out": (32, 64, 8),
         "lightning_bwd_dqk": (32, 32, 8)},
}
# The kernels' chunk: [C, C] score tiles beyond 64 x 64 spill. The result does not depend on the
# chunking (every chunk size computes the same recurrence), so a larger chunk_size runs as 64.
MAX_BLOCK_C = 64


def launch_params(dk: int, dv: int, chunk_size: int, arch: int) -> dict:
    """Kernel name -> (constexprs, num_warps, num_stages) of each lightning launch for head dims
    (dk, dv) and chunk_size on sm_<arch>; the launcher and aot_specs both read it."""
    block_dk, block_dv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
    params = {}
    for name, (bk, bv, warps) in _TILES[arch].items():
        tiles = dict(BLOCK_C=min(chunk_size, MAX_BLOCK_C), BK=min(bk, block_dk), BV=min(bv, block_dv))
        if name == "lightning_chunk_out":
            tiles["BLOCK_DK"] = block_dk
        if name == "lightning_bwd_dqk":
            tiles["BLOCK_DV"] = block_dv
        params[name] = (tiles, warps, 1)
    return params


def _params(q, v, chunk_size):
    from .aot import ARCHS, device_arch

    # The interpreter (CPU tensors) runs sm_90's launch.
    return launch_params(q.shape[-1], v.shape[-1], chunk_size, device_arch(q.device) if q.is_cuda else ARCHS[-1])


def _log_decay(log_decay, H, device):
    return torch.zeros(H, device=device) if log_decay is None else log_decay.float().contiguous()


def _doc_args(doc_ids, initial_doc, device) -> tuple:
    """The kernels' (DOC [B, N] int32, DOC_IN [B] int32, HAS_DOC). Without doc_ids the pointers
    are a 1-element placeholder the HAS_DOC=False kernels never read; DOC_IN defaults to the
    row's first id (the first document continues S_0)."""
    if doc_ids is None:
        none = torch.empty(1, device=device, dtype=torch.int32)  # no fill launch: never read
        return none, none, False
    doc = doc_ids.to(torch.int32).contiguous()
    doc_in = doc[:, 0] if initial_doc is None else initial_doc.to(torch.int32)
    return doc, doc_in.contiguous(), True


def _chain(x, y, g, docs, start, reverse, params):
    """States of the chunk chain over x [B, H, N, Dk], y [B, H, N, Dv] -> (per-chunk states
    [B*H, n_chunks, Dk, Dv] fp32, end state [B, H, Dk, Dv] fp32): S_c and the final state
    from start = S_0, or with reverse (x = q, y = do, start = d_final) dS_c and d_initial.
    start None: zeros. docs: _doc_args."""
    B, H, N, Dk = x.shape
    Dv = y.shape[-1]
    (tiles, warps, stages), (ptiles, pwarps, pstages) = params["lightning_chunk_state"], params["lightning_prefix"]
    n_chunks = triton.cdiv(N, tiles["BLOCK_C"])
    states = torch.empty(B * H, n_chunks, Dk, Dv, device=x.device, dtype=torch.float32)
    end = torch.empty(B, H, Dk, Dv, device=x.device, dtype=torch.float32)
    start = torch.zeros_like(end) if start is None else start.contiguous()
    n_tiles = triton.cdiv(Dk, tiles["BK"]) * triton.cdiv(Dv, tiles["BV"])
    doc, doc_in, has_doc = docs
    _chunk_state_kernel[(n_chunks, n_tiles, B * H)](x, y, states, g, doc, doc_in, H, N, Dk, Dv, REVERSE=reverse,
                                                    HAS_DOC=has_doc, **tiles, num_warps=warps, num_stages=stages)
    n_tiles = triton.cdiv(Dk, ptiles["BK"]) * triton.cdiv(Dv, ptiles["BV"])
    _prefix_kernel[(n_tiles, B * H)](states, start, end, g, doc, doc_in, H, N, Dk, Dv, REVERSE=reverse,
                                     HAS_DOC=has_doc, **ptiles, num_warps=pwarps, num_stages=pstages)
    return states, end


def lightning_triton_fwd(q, k, v, log_decay, initial_state, chunk_size=64, doc_ids=None, initial_doc=None):
    """q, k: [B, H, N, Dk]; v: [B, H, N, Dv]; doc_ids [B, N], initial_doc [B] or None
    -> o [B, H, N, Dv], final state [B, H, Dk, Dv] fp32."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N, Dk = q.shape
    params = _params(q, v, chunk_size)
    g = _log_decay(log_decay, H, q.device)
    docs = _doc_args(doc_ids, initial_doc, q.device)
    states, final = _chain(k, v, g, docs, initial_state, False, params)
    o = torch.empty_like(v, dtype=q.dtype)
    tiles, warps, stages = params["lightning_chunk_out"]
    grid = (states.shape[1], triton.cdiv(v.shape[-1], tiles["BV"]), B * H)
    _chunk_out_kernel[grid](q, k, v, o, states, g, docs[0], docs[1], H, N, Dk, v.shape[-1], FOR_DV=False,
                            HAS_DOC=docs[2], **tiles, num_warps=warps, num_stages=stages)
    return o, final


def lightning_triton_bwd(q, k, v, log_decay, initial_state, do, d_final, chunk_size=64, decay_grad=False,
                         doc_ids=None, initial_doc=None):
    """Gradients dq, dk, dv (input dtypes), d_initial [B, H, Dk, Dv] fp32, and with decay_grad
    the gradient with respect to log_decay ([H] fp32, summed over the batch), else None."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    params = _params(q, v, chunk_size)
    g = _log_decay(log_decay, H, q.device)
    docs = _doc_args(doc_ids, initial_doc, q.device)
    states, _ = _chain(k, v, g, docs, initial_state, False, params)
    d_states, d_init = _chain(q, do, g, docs, d_final, True, params)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    n_chunks = states.shape[1]
    tiles, warps, stages = params["lightning_bwd_dqk"]
    grid = (n_chunks, triton.cdiv(Dk, tiles["BK"]), B * H)
    # dq and dk are two launches of one kernel: together they would spill (do v^T and two accumulators).
    dg = torch.empty(2, B * H * n_chunks * grid[1] if decay_grad else 1, device=q.device, dtype=torch.float32)
    for for_dk, out in enumerate((dq, dk)):
        _bwd_dqk_kernel[grid](q, k, v, do, out, states, d_states, dg[for_dk], g, docs[0], docs[1], H, N, Dk, Dv,
                              FOR_DK=bool(for_dk), DECAY_GRAD=decay_grad, HAS_DOC=docs[2], **tiles,
                              num_warps=warps, num_stages=stages)
    tiles, warps, stages = params["lightning_chunk_out"]
    _chunk_out_kernel[(n_chunks, triton.cdiv(Dv, tiles["BV"]), B * H)](k, q, do, dv, d_states, g, docs[0], docs[1],
                                                                       H, N, Dk, Dv, FOR_DV=True, HAS_DOC=docs[2],
                                                                       **tiles, num_warps=warps, num_stages=stages)
    d_log_decay = dg.view(2, B, H, -1).sum((0, 1, 3)) if decay_grad else None
    return dq, dk, dv, d_init, d_log_decay


_FNS = {"lightning_chunk_state": _chunk_state_kernel, "lightning_prefix": _prefix_kernel,
        "lightning_chunk_out": _chunk_out_kernel, "lightning_bwd_dqk": _bwd_dqk_kernel}
# The flag constexprs of each kernel, every combination of which is launched: REVERSE (state
# chain / gradient chain), FOR_DV (o / dv), FOR_DK (dq / dk), DECAY_GRAD (learn_decay),
# HAS_DOC (packed documents).
_FLAGS = {"lightning_chunk_state": ("REVERSE", "HAS_DOC"), "lightning_prefix": ("REVERSE", "HAS_DOC"),
          "lightning_chunk_out": ("FOR_DV", "HAS_DOC"), "lightning_bwd_dqk": ("FOR_DK", "DECAY_GRAD", "HAS_DOC")}
# Pointers that are fp32 whatever the input dtype, and the int32 document ids; the others have q's dtype.
_FP32_POINTERS = ("STATES", "D_STATES", "S_START", "S_END", "LOG_DECAY", "DG")
_INT32_POINTERS = ("DOC", "DOC_IN")
HEAD_DIMS = (32, 64, 128)
_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def aot_specs() -> list:
    """Every lightning launch for head dims 32, 64, 128 (Dk = Dv), fp32 and bf16, the configs'
    chunk size 64 and each flag combination, per arch; default for the presets' head dims and
    dtypes (kernels/aot.py PRESET_*)."""
    import itertools

    from .aot import ARCHS, PRESET_DTYPES, PRESET_MODELS, AOTSpec, signature

    preset_dims = {d for d, _ in PRESET_MODELS}
    specs = []
    for arch, head_dim, dtype in itertools.product(ARCHS, HEAD_DIMS, _TRITON_DTYPES):
        pointers = {name: "fp32" if name in _FP32_POINTERS else _TRITON_DTYPES[dtype]
                    for name in ("Q", "K", "V", "A", "B", "X", "Y", "DO", "OUT") + _FP32_POINTERS}
        pointers.update(dict.fromkeys(_INT32_POINTERS, "i32"))
        for name, (tiles, warps, stages) in launch_params(head_dim, head_dim, 64, arch).items():
            fn = _FNS[name]
            for values in itertools.product((False, True), repeat=len(_FLAGS[name])):
                constexprs = {**tiles, **dict(zip(_FLAGS[name], values))}
                specs.append(AOTSpec(name, fn, signature(fn, constexprs, pointers), constexprs, warps, stages,
                                     dict(arch=arch, dtype=_TRITON_DTYPES[dtype], head_dim=head_dim, **constexprs),
                                     head_dim in preset_dims and dtype in PRESET_DTYPES, ("N", "DK", "DV")))
    return specs
