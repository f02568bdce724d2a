"""The fast CPU path of block-sparse attention (impl="torch"): bands and
gathers over the active blocks, in PyTorch. The oracle the tests trust is the
small kernels/block_sparse_ref.py; this module and the Triton kernel are both
checked against it.

For query i (global position q_start + i) and the keys j of the key blocks
active for its query block (global position k_start + j):

    s_ij = sm_scale * q_i . k_j,  masked to -inf unless k_start + j <= q_start + i (causal)
    lse_i = log sum_j exp(s_ij),  o_i = sum_j exp(s_ij - lse_i) v_j

A row with no visible key has o_i = 0 and lse_i = -inf.

How: a "row" is one query block of one selection head (below). Its active
key blocks are classified against the causal rule as full (every key visible
to every query), partial (the diagonal: a token-level mask) or invisible
(dropped); the kept ones are sorted ascending, so partial blocks come last.
Each row's kept blocks are split into parts, each solved by torch's fused CPU
flash-attention kernel (the one SDPA uses; it returns lse and recomputes in
its backward), and the parts are merged exactly through their lse:

    band:   the contiguous run of blocks ending at the row's last kept block
            (the local window). Consecutive rows with one band length read
            consecutive, overlapping K/V windows, so a run of them is one
            strided view of K/V (no copy) and one kernel call.
    prefix: the rest, when it is a prefix of one block list shared by its
            selection head (S2's vertical stripes): that list is gathered
            once per head, and the rows with the same prefix length are
            stacked as the queries of one call against it.
    gather: anything else (any layout, e.g. InfLLM-V2's top-k picks): rows
            with the same number of blocks and the same partial offsets
            form one dense sub-problem with one shared [R, S] mask, each row
            against its own gathered K/V.

Document ids (packed rows: q_doc [B, Nq], k_doc [B, Nk], non-decreasing)
split the layout first (doc_split), from each block's first and last id:
a (query block, key block) pair whose id ranges do not meet is dropped (its
K/V are never gathered); a pair inside one common document needs no token
mask and goes to the parts above unchanged; every other pair (a block that
spans a boundary) is gathered with its own explicit [Rq, S] mask of
q_doc_i == k_doc_j (and causality), merged through lse like the rest.

In the backward every part uses the row's overall lse and delta, so the
parts' dq add up and their dK/dV accumulate by block. Memory stays
proportional to the active blocks (at most GROUP_ELEMENTS K/V elements per
call); nothing of size Nq x Nk exists. Compute is fp32 whatever the input dtype.

Heads are processed as "selection heads" s: with a per-query-head layout every
query head is its own selection head; with a shared (per-KV-head or global)
layout the Gs = Hq / Hkv query heads of a GQA group are stacked as extra rows
of one selection head, so each K/V block is read once per group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import BlockLayout
from .lse import merge_lse

# K (or V) elements per kernel call: bounds the working set to a few x 32 MiB.
GROUP_ELEMENTS = 1 << 23
# Rows that must share a band view or a prefix list for it to pay off; fewer are gathered.
MIN_SHARED_ROWS = 4

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _selection_heads(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout) -> tuple[int, int]:
    """(Hs, Gs): selection heads and query heads stacked in each."""
    Hq, Hkv = q.shape[1], k.shape[1]
    hs = Hq if layout.counts.shape[1] == Hq else Hkv
    return hs, Hq // hs


def _plan(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout):
    """Map query heads onto selection heads: returns the KV head of each
    selection head and counts/indices [B, Hs, Mq(, K)]."""
    B, Hq = q.shape[:2]
    hs, gs = _selection_heads(q, k, layout)
    dev = q.device
    kv_of_s = torch.arange(hs, device=dev) // (hs // k.shape[1])
    if layout.counts.shape[1] == Hq:
        layout_of_s = torch.arange(Hq, device=dev)
    else:
        layout_of_s = kv_of_s if layout.counts.shape[1] == k.shape[1] else torch.zeros_like(kv_of_s)
    counts = layout.counts[:, layout_of_s].expand(B, hs, -1)
    indices = layout.indices[:, layout_of_s].expand(B, hs, -1, -1)
    return hs, gs, kv_of_s, counts, indices


def _group(x: torch.Tensor, hs: int, gs: int, block_size: int) -> torch.Tensor:
    """[B, Hq, N, *rest] -> [B * Hs * M, Gs * block_size, *rest]: one row per
    (batch, selection head, query block), holding all heads of the selection head."""
    B, _, N, *rest = x.shape
    x = x.reshape(B, hs, gs, N // block_size, block_size, *rest).transpose(2, 3)
    return x.reshape(B * hs * (N // block_size), gs * block_size, *rest)


def _ungroup(x: torch.Tensor, B: int, hs: int, gs: int, block_size: int) -> torch.Tensor:
    """Inverse of _group: [B * Hs * M, Gs * block_size, *rest] -> [B, Hq, N, *rest]."""
    rows, _, *rest = x.shape
    M = rows // (B * hs)
    x = x.reshape(B, hs, M, gs, block_size, *rest).transpose(2, 3)
    return x.reshape(B, hs * gs, M * block_size, *rest)


class _Rows(NamedTuple):
    """Per row (b, s, query block) of _group(q), kept blocks ascending first:
    flat [R, W] block ids into k.reshape(-1, bs, D) (padding after n_keep is
    junk), n_keep [R], n_part [R] partial blocks (the last n_part kept),
    part_d [R, 2] their offsets (below), mq query blocks per selection head."""
    flat: torch.Tensor
    n_keep: torch.Tensor
    n_part: torch.Tensor
    part_d: torch.Tensor
    mq: int


def _rows(q, k, layout, *, block_size, causal, q_start, k_start) -> _Rows:
    """Classify each row's active blocks. Offset d = (q block start) - (k block
    start) in global tokens: key t of a block is visible to query r iff t - r <= d,
    so the block is dropped when d <= -bs and partial when d < bs - 1."""
    hs, gs, kv_of_s, counts, indices = _plan(q, k, layout)
    B, Hkv, Nk, _ = k.shape
    bs, mk, mq, width = block_size, Nk // block_size, counts.shape[2], indices.shape[3]
    dev = q.device
    idx = indices.long().clamp_min(0)
    keep = torch.arange(width, device=dev) < counts[..., None]
    d = q_start - k_start + (torch.arange(mq, device=dev)[:, None] - idx) * bs
    partial = torch.zeros_like(keep)
    if causal:
        keep &= d > -bs
        partial = keep & (d < bs - 1)
    order = torch.where(keep, idx, mk).argsort(dim=-1)
    flat = (torch.arange(B, device=dev)[:, None, None, None] * Hkv + kv_of_s[None, :, None, None]) * mk + idx
    flat, d = flat.gather(-1, order).reshape(-1, width), d.gather(-1, order).reshape(-1, width)
    n_keep, n_part = keep.sum(-1).reshape(-1), partial.sum(-1).reshape(-1)
    # A partial block's offset is in (-bs, bs) and blocks differ by multiples of bs: at most 2 per row.
    two = torch.arange(2, device=dev)
    slot = (n_keep - n_part)[:, None] + two
    part_d = torch.where(two < n_part[:, None], d.gather(-1, slot.clamp(0, max(width - 1, 0))), 0)
    return _Rows(flat, n_keep, n_part, part_d, mq)


def _mask(rows_per_query_block: int, nk: int, part_d: list[int], block_size: int, device):
    """Additive mask [1, 1, R, nk * bs] for nk blocks whose last len(part_d) are
    partial, and blind [R] bool (queries seeing no key) when all are partial;
    (None, None) without partial blocks."""
    if not part_d:
        return None, None
    bs = block_size
    r = torch.arange(rows_per_query_block, device=device)[:, None] % bs
    t = torch.arange(bs, device=device)
    mask = torch.zeros(rows_per_query_block, nk * bs, device=device)
    for p, dp in enumerate(part_d):
        lo = (nk - len(part_d) + p) * bs
        mask[:, lo:lo + bs].masked_fill_(t - r > dp, float("-inf"))
    return mask[None, None], (torch.isinf(mask).all(-1) if nk == len(part_d) else None)


def _runs(flag: torch.Tensor, starts_new: torch.Tensor):
    """Split rows 0..R-1 into runs (a row with starts_new begins one); yield
    (first row, length) of the runs whose rows all have flag."""
    starts_new = starts_new.clone()
    starts_new[0] = True
    first = starts_new.nonzero()[:, 0]
    lengths = torch.diff(first, append=torch.tensor([len(flag)], device=flag.device))
    ok = torch.segment_reduce(flag.float(), "min", lengths=lengths) > 0
    return first[ok].tolist(), lengths[ok].tolist()


class _Band(NamedTuple):
    """Rows r0..r0+n-1 attend blocks p0+t .. p0+t+L-1 (row r0+t) of the flat
    K/V blocks, the last len(part_d) partial with those offsets."""
    r0: int
    n: int
    p0: int
    length: int
    part_d: list[int]


def _bands(rows: _Rows) -> tuple[list[_Band], torch.Tensor]:
    """Band runs, and each row's blocks left after its band [R] (n_keep for
    rows outside a run). The band is the maximal run of consecutive blocks
    ending at the last kept block, trimmed to its neighbours' length: a band
    longer than both neighbours (e.g. a stripe touching the window) would
    split a run, so its extra blocks are left to the other parts."""
    flat, n_keep, n_part, part_d, _ = rows
    R, width = flat.shape
    dev = flat.device
    pos = torch.arange(width, device=dev)
    brk = torch.ones_like(flat, dtype=torch.bool)
    brk[:, 1:] = flat[:, 1:] - flat[:, :-1] != 1
    start = torch.where(brk, pos, 0).cummax(-1).values.gather(-1, (n_keep - 1).clamp_min(0)[:, None])[:, 0]
    length = torch.where(n_keep > 0, n_keep - start, 0)
    padded = torch.nn.functional.pad(length[None, None].float(), (1, 1), mode="replicate")[0, 0].long()
    length = torch.minimum(length, torch.maximum(torch.minimum(padded[:-2], padded[2:]), n_part))
    first = flat.gather(-1, (n_keep - length).clamp(0, max(width - 1, 0))[:, None])[:, 0]
    key = torch.cat([length[:, None], n_part[:, None], part_d], 1)
    new = torch.ones(R, dtype=torch.bool, device=dev)
    new[1:] = (key[1:] != key[:-1]).any(-1) | (first[1:] != first[:-1] + 1)
    bands, rest = [], n_keep.clone()
    for r0, n in zip(*_runs(length > 0, new)):
        if n >= MIN_SHARED_ROWS:
            L, npart = int(length[r0]), int(n_part[r0])
            bands.append(_Band(r0, n, int(first[r0]), L, part_d[r0, :npart].tolist()))
            rest[r0:r0 + n] -= L
    return bands, rest


class _Prefix(NamedTuple):
    """blocks [nu]: one selection head's shared list; groups: (rows [n], nf),
    rows attending its first nf blocks (all full)."""
    blocks: torch.Tensor
    groups: list[tuple[torch.Tensor, int]]


def _prefixes(rows: _Rows, rest: torch.Tensor, in_band: torch.Tensor) -> tuple[list[_Prefix], torch.Tensor]:
    """Rows whose remaining blocks are a prefix of their head's longest
    remaining list; returns the prefix parts and each row's blocks left [R]."""
    flat, mq = rows.flat, rows.mq
    R, width = flat.shape
    dev = flat.device
    heads = R // mq
    ref = rest.view(heads, mq).argmax(-1) + torch.arange(heads, device=dev) * mq
    head_of = torch.arange(R, device=dev) // mq
    pos = torch.arange(width, device=dev)
    full = in_band | (rows.n_part == 0)  # a band holds the row's partial blocks
    ok = ((flat == flat[ref][head_of]) | (pos >= rest[:, None])).all(-1) & full & (rest > 0)
    key = torch.where(ok, head_of * (width + 1) + rest, -1)
    sigs, which, sizes = torch.unique(key, return_inverse=True, return_counts=True)
    parts, left = {}, rest.clone()
    for sig, members, size in zip(sigs.tolist(), _members(which, len(sigs)), sizes.tolist()):
        if sig < 0 or size < MIN_SHARED_ROWS:
            continue
        head, nf = divmod(sig, width + 1)
        parts.setdefault(head, []).append((members, nf))
        left[members] = 0
    out = [_Prefix(flat[ref[h], :max(nf for _, nf in g)], g) for h, g in parts.items()]
    return out, left


def _gathered(rows: _Rows, rest: torch.Tensor, in_band: torch.Tensor, *, rows_per_query_block, block_size, head_dim):
    """Yield (rows [n], blocks [n, nk], mask, blind) for the first `rest`
    blocks of each row, rows grouped by block count and partial offsets."""
    n_part = torch.where(in_band, 0, rows.n_part)
    part_d = torch.where(torch.arange(2, device=rest.device) < n_part[:, None], rows.part_d, 0)
    sigs, which = torch.unique(torch.stack([rest, n_part, part_d[:, 0], part_d[:, 1]], 1), dim=0,
                               return_inverse=True)
    for sig, members in zip(sigs.tolist(), _members(which, len(sigs))):
        nk, npart, pd = sig[0], sig[1], sig[2:2 + sig[1]]
        if nk == 0:
            continue
        mask, blind = _mask(rows_per_query_block, nk, pd, block_size, rest.device)
        chunk = max(1, GROUP_ELEMENTS // (nk * block_size * head_dim))
        for part in members.split(chunk):
            yield part, rows.flat[part, :nk], mask, blind


def _members(which: torch.Tensor, n: int):
    """Row ids of each signature, one argsort instead of n nonzero scans."""
    order = which.argsort(stable=True)
    return order.split(torch.bincount(which, minlength=n).tolist())


def doc_split(layout: BlockLayout, q_doc: torch.Tensor, k_doc: torch.Tensor, *, block_size: int, causal: bool,
              q_start: int, k_start: int) -> tuple[BlockLayout, BlockLayout]:
    """Block layout [Bl, Hl, Mq, K] and non-decreasing document ids q_doc [B, Nq], k_doc [B, Nk]
    -> (clean, mixed) layouts [B, Hl, Mq, K] over the pairs whose documents can meet: a block's
    ids lie in [its first id, its last id], and two blocks can share a document only if those
    ranges intersect; the others are in neither layout (skipped). clean: query and key block
    inside one common document (no token mask); mixed: the rest, causally visible."""
    bs, mk = block_size, layout.num_k_blocks
    B, (_, Hl, Mq, K) = q_doc.shape[0], layout.indices.shape
    idx = layout.indices.expand(B, -1, -1, -1)
    blocks = idx.clamp_min(0).long().reshape(B, -1)
    klo, khi = (ids.gather(1, blocks).view(idx.shape) for ids in (k_doc[:, ::bs], k_doc[:, bs - 1::bs]))
    qlo, qhi = q_doc[:, None, ::bs, None], q_doc[:, None, bs - 1::bs, None]
    meet = (idx >= 0) & (klo <= qhi) & (qlo <= khi)
    single = (qlo == qhi) & (klo == khi) & (klo == qlo)
    mixed = meet & ~single
    if causal:  # the mixed part masks every position itself: leave out blocks wholly in the future
        q_end = q_start + torch.arange(Mq, device=idx.device)[:, None] * bs + bs - 1
        mixed &= k_start + idx * bs <= q_end
    return (BlockLayout.from_indices(torch.where(meet & single, idx, -1), mk),
            BlockLayout.from_indices(torch.where(mixed, idx, -1), mk))


def _doc_gathered(q, k, mixed: BlockLayout, q_doc, k_doc, *, block_size, causal, q_start, k_start):
    """Yield (rows [n], blocks [n, nk], mask [n, 1, Rq, nk * bs], blind [n, 1, Rq]) for the mixed pairs:
    rows (of _group(q)) with the same number of mixed blocks, each with its explicit token mask
    q_doc_i == k_doc_j (and k_start + j <= q_start + i when causal) and its queries seeing no key."""
    hs, gs, kv_of_s, counts, indices = _plan(q, k, mixed)
    B, Hkv, Nk, D = k.shape
    Nq, bs, mk, mq = q.shape[2], block_size, Nk // block_size, counts.shape[2]
    dev = q.device
    counts, idx = counts.reshape(-1), indices.long().clamp_min(0).reshape(B * hs * mq, -1)
    flat = ((torch.arange(B, device=dev)[:, None] * Hkv + kv_of_s) * mk).reshape(-1).repeat_interleave(mq)
    b_of = torch.arange(B * hs * mq, device=dev) // (hs * mq)
    qb_of = torch.arange(B * hs * mq, device=dev) % mq
    sigs, which = torch.unique(counts, return_inverse=True)
    t = torch.arange(bs, device=dev)
    for nk, members in zip(sigs.tolist(), _members(which, len(sigs))):
        if nk == 0:
            continue
        chunk = max(1, GROUP_ELEMENTS // (nk * bs * max(D, gs * bs)))
        for rows in members.split(chunk):
            b, blocks = b_of[rows, None], idx[rows, :nk]
            q_tok = qb_of[rows, None] * bs + t.repeat(gs)                       # [n, Rq]
            k_tok = (blocks[..., None] * bs + t).flatten(1)                     # [n, nk * bs]
            ok = q_doc.view(-1)[b * Nq + q_tok][..., None] == k_doc.view(-1)[b * Nk + k_tok][:, None]
            if causal:
                ok &= k_start + k_tok[:, None] <= q_start + q_tok[..., None]
            mask = torch.zeros(ok.shape, device=dev).masked_fill_(~ok, float("-inf"))[:, None]
            yield rows, flat[rows, None] + blocks, mask, ~ok.any(-1)[:, None]


class _Parts(NamedTuple):
    bands: list[_Band]
    prefixes: list[_Prefix]
    gathered: list
    rows_per_query_block: int


def _parts(q, k, layout, *, block_size, causal, q_start, k_start, q_doc=None, k_doc=None) -> _Parts:
    """Split every row's kept blocks into band, prefix and gathered parts. With document ids only
    the pairs inside one document go to those; the pairs across a boundary become extra gathered
    parts with their own masks, and the pairs whose documents cannot meet are dropped (doc_split)."""
    hs, gs = _selection_heads(q, k, layout)
    if layout.indices.shape[3] == 0:
        return _Parts([], [], [], gs * block_size)
    pos = dict(block_size=block_size, causal=causal, q_start=q_start, k_start=k_start)
    doc_parts = []
    if q_doc is not None:
        layout, mixed = doc_split(layout, q_doc, k_doc, **pos)
        doc_parts = list(_doc_gathered(q, k, mixed, q_doc, k_doc, **pos))
    rows = _rows(q, k, layout, **pos)
    bands, rest = _bands(rows)
    in_band = rest < rows.n_keep
    prefixes, rest = _prefixes(rows, rest, in_band)
    gathered = list(_gathered(rows, rest, in_band, rows_per_query_block=gs * block_size, block_size=block_size,
                              head_dim=q.shape[-1]))
    return _Parts(bands, prefixes, gathered + doc_parts, gs * block_size)


def _band_chunks(band: _Band, block_size: int, head_dim: int):
    """(first row, rows) chunks of a band run within GROUP_ELEMENTS."""
    chunk = max(1, GROUP_ELEMENTS // (band.length * block_size * head_dim))
    for t in range(0, band.n, chunk):
        yield t, min(chunk, band.n - t)


def _window(xb: torch.Tensor, first_block: int, n: int, length: int) -> torch.Tensor:
    """xb [blocks, bs, Dk] contiguous -> [n, 1, length * bs, Dk] view: window t is
    blocks first_block + t .. + length - 1 (windows overlap; nothing is copied)."""
    _, bs, dk = xb.shape
    return xb.as_strided((n, 1, length * bs, dk), (bs * dk, bs * dk, dk, 1), xb.storage_offset() + first_block * bs * dk)


def _take(x: torch.Tensor, rows) -> torch.Tensor:
    """x[rows] for a slice (a view) or row ids (index_select: advanced indexing is several x slower)."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _add(x: torch.Tensor, rows, y: torch.Tensor):
    """x[rows] += y, rows distinct."""
    if isinstance(rows, slice):
        x[rows] += y
    else:
        x.index_add_(0, rows, y)


def _merge(out, lse, rows, o, l):
    """Fold a part's (o, lse) into the running (out, lse) of `rows` (kernels.lse.merge_lse)."""
    merged, new = merge_lse(_take(out, rows), _take(lse, rows), o, l)
    if isinstance(rows, slice):
        out[rows], lse[rows] = merged, new
    else:
        out.index_copy_(0, rows, merged)
        lse.index_copy_(0, rows, new)


def forward(q, k, v, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float, q_start: int, k_start: int,
            q_doc=None, k_doc=None):
    """q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D], document ids q_doc [B, Nq], k_doc [B, Nk] or None
    -> out [B, Hq, Nq, D] (q.dtype), lse [B, Hq, Nq] fp32."""
    B, D, bs = q.shape[0], q.shape[-1], block_size
    hs, gs = _selection_heads(q, k, layout)
    qg = _group(q.float(), hs, gs, bs)
    kb, vb = k.float().reshape(-1, bs, D), v.float().reshape(-1, bs, D)
    # fp32 running (out, lse): every part (band, prefix, gathered, doc-mixed) is merged into them
    # through merge_lse, a rescale-and-add per part; rounded to q.dtype once, at the end.
    out = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(qg.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    parts = _parts(q, k, layout, block_size=bs, causal=causal, q_start=q_start, k_start=k_start, q_doc=q_doc,
                   k_doc=k_doc)

    def attend(rows, shape, kx, vx, mask, blind):
        """shape: the kernel's [n, 1, Rq, D] view of the rows' queries."""
        qx = _take(qg, rows)
        o, l = _flash_fwd(qx.view(shape), kx, vx, 0.0, False, attn_mask=mask, scale=sm_scale)
        if blind is not None:
            l.masked_fill_(blind, float("-inf"))  # the kernel gives such a query out 0 but lse 0
        _merge(out, lse, rows, o.view(qx.shape), l.view(qx.shape[:-1]))

    for band in parts.bands:
        mask, blind = _mask(parts.rows_per_query_block, band.length, band.part_d, bs, q.device)
        for t, n in _band_chunks(band, bs, D):
            rows = slice(band.r0 + t, band.r0 + t + n)
            attend(rows, (n, 1, -1, D), _window(kb, band.p0 + t, n, band.length),
                   _window(vb, band.p0 + t, n, band.length), mask, blind)
    for prefix in parts.prefixes:
        ku, vu = kb.index_select(0, prefix.blocks), vb.index_select(0, prefix.blocks)
        for rows, nf in prefix.groups:
            attend(rows, (1, 1, -1, D), ku[:nf].view(1, 1, -1, D), vu[:nf].view(1, 1, -1, D), None, None)
    for rows, blocks, mask, blind in parts.gathered:
        n, flat = blocks.shape[0], blocks.reshape(-1)
        attend(rows, (n, 1, -1, D), kb.index_select(0, flat).view(n, 1, -1, D),
               vb.index_select(0, flat).view(n, 1, -1, D), mask, blind)
    return _ungroup(out, B, hs, gs, bs).to(q.dtype), _ungroup(lse, B, hs, gs, bs)


def _pad(x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """[..., D] -> [..., D + 1] fp32, the extra column `last` (default 0)."""
    col = torch.zeros(*x.shape[:-1], 1, device=x.device) if last is None else last[..., None]
    return torch.cat([x.float(), col], -1)


def backward(do, q, k, v, lse, delta, layout: BlockLayout, *, block_size: int, causal: bool, sm_scale: float,
             q_start: int, k_start: int, q_doc=None, k_doc=None):
    """Gradients from the saved lse and delta_i = do_i . o_i - dlse_i ([B, Hq, Nq] fp32):

        p_ij = exp(s_ij - lse_i),  dv_j = sum_i p_ij do_i,  ds_ij = p_ij (do_i . v_j - delta_i),
        dq_i = sm_scale sum_j ds_ij k_j,  dk_j = sm_scale sum_i ds_ij q_i

    p_ij needs only the overall lse_i, so each part (band, prefix, gathered)
    is one kernel call on its own keys, and the parts' dq add up. The flash
    kernel computes delta itself as rowsum(do * out), and we have delta but
    not out: so every head dim gets one extra column, 0 in q, k and v (scores
    and do . v unchanged), delta_i in do and 1 in out, with out's other
    columns 0; then rowsum(do * out) = delta_i exactly. dK/dV of a KV head
    accumulate over its query heads and query blocks by block index."""
    B, D, bs = q.shape[0], q.shape[-1], block_size
    hs, gs = _selection_heads(q, k, layout)
    qg, dog = _group(_pad(q), hs, gs, bs), _group(_pad(do, delta), hs, gs, bs)
    # An empty row (lse -inf) has every score -inf: lse 0 gives p = 0, no NaN.
    lseg = _group(lse.masked_fill(lse == float("-inf"), 0.0), hs, gs, bs)
    kb, vb = _pad(k).reshape(-1, bs, D + 1), _pad(v).reshape(-1, bs, D + 1)
    out_ones = torch.zeros(D + 1, device=q.device)
    out_ones[D] = 1.0
    # fp32 accumulators: dq adds up over the parts of a row, dK/dV over every part, query head and
    # query block that reads a key block (index_add_ / slice adds); rounded to the input dtypes once.
    dq = torch.zeros(qg.shape[0], qg.shape[1], D + 1, dtype=torch.float32, device=q.device)
    dk = torch.zeros(kb.shape[0], bs * (D + 1), dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    parts = _parts(q, k, layout, block_size=bs, causal=causal, q_start=q_start, k_start=k_start, q_doc=q_doc,
                   k_doc=k_doc)

    def grads(rows, shape, kx, vx, mask):
        """(dk, dv) of kx, vx; adds dq into rows. shape: the kernel's [n, 1, Rq, D + 1] view of the rows."""
        qx = _take(qg, rows).view(shape)
        g_q, g_k, g_v = _flash_bwd(_take(dog, rows).view(shape), qx, kx, vx, out_ones.expand(qx.shape),
                                   _take(lseg, rows).view(qx.shape[:-1]), 0.0, False, attn_mask=mask, scale=sm_scale)
        _add(dq, rows, g_q.view(-1, *dq.shape[1:]))
        return g_k, g_v

    for band in parts.bands:
        mask, _ = _mask(parts.rows_per_query_block, band.length, band.part_d, bs, q.device)
        for t, n in _band_chunks(band, bs, D + 1):
            rows, p = slice(band.r0 + t, band.r0 + t + n), band.p0 + t
            g_k, g_v = grads(rows, (n, 1, -1, D + 1), _window(kb, p, n, band.length), _window(vb, p, n, band.length),
                             mask)
            # Window t covers blocks p + t + j: add block slot j of every window in one contiguous slice.
            for j, (gk, gv) in enumerate(zip(g_k.view(n, band.length, -1).unbind(1), g_v.view(n, band.length, -1).unbind(1))):
                dk[p + j:p + j + n] += gk
                dv[p + j:p + j + n] += gv
    for prefix in parts.prefixes:
        ku, vu = kb.index_select(0, prefix.blocks), vb.index_select(0, prefix.blocks)
        dku, dvu = torch.zeros(2, *ku.shape, device=q.device).view(2, ku.shape[0], -1).unbind(0)
        for rows, nf in prefix.groups:
            g_k, g_v = grads(rows, (1, 1, -1, D + 1), ku[:nf].view(1, 1, -1, D + 1), vu[:nf].view(1, 1, -1, D + 1),
                             None)
            dku[:nf] += g_k.view(nf, -1)
            dvu[:nf] += g_v.view(nf, -1)
        dk.index_add_(0, prefix.blocks, dku)
        dv.index_add_(0, prefix.blocks, dvu)
    for rows, blocks, mask, _ in parts.gathered:
        n, flat = blocks.shape[0], blocks.reshape(-1)
        g_k, g_v = grads(rows, (n, 1, -1, D + 1), kb.index_select(0, flat).view(n, 1, -1, D + 1),
                         vb.index_select(0, flat).view(n, 1, -1, D + 1), mask)
        # Accumulate padded, contiguous rows (index_add_ on a sliced source is several x slower).
        dk.index_add_(0, flat, g_k.view(-1, bs * (D + 1)))
        dv.index_add_(0, flat, g_v.view(-1, bs * (D + 1)))
    dk, dv = (x.view(-1, bs, D + 1)[..., :D].reshape(k.shape).to(k.dtype) for x in (dk, dv))
    return _ungroup(dq[..., :D], B, hs, gs, bs).to(q.dtype), dk, dv
