"""The fast CPU path (impl="torch", kernels/block_sparse_cpu.py) against the
oracle kernels/block_sparse_ref.py (SDPA with the layout's explicit mask), and
against a naive per-token loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from ltrain.kernels import BlockLayout, block_sparse_attention
from ltrain.kernels import block_sparse_cpu
from ltrain.kernels.block_sparse_ref import layout_mask as dense_mask
from ltrain.kernels.block_sparse_ref import block_sparse_reference
from ltrain.kernels.block_sparse_ref import masked_attention as sdpa_reference
from tests.precision import assert_half_precision


def random_layout(Bl, Hl, Mq, Mk, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return BlockLayout.from_block_mask(torch.rand(Bl, Hl, Mq, Mk, generator=g) < density)


def make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype).requires_grad_()
    do = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    dlse = torch.randn(B, Hq, Nq, generator=g)
    return q, k, v, do, dlse


def run(fn, q, k, v, do, dlse):
    """Forward, then gradients of <out, do> + <lse, dlse> (lse gets a gradient
    as ring attention gives it one); -inf lse rows carry no gradient."""
    out, lse = fn(q, k, v)
    loss = (out.float() * do.float()).sum() + torch.where(torch.isfinite(lse), lse * dlse, 0.0).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def assert_close(got, want, names, rtol=1e-5, atol=1e-5):
    for g, w, name in zip(got, want, names):
        assert g.shape == w.shape, name
        assert not g.isnan().any(), f"{name} has NaN"
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


NAMES = ("out", "lse", "dq", "dk", "dv")


def check_against_sdpa(B, Hq, Hkv, Nq, Nk, D, layout, block_size, *, causal=True, q_start=0, k_start=0):
    q, k, v, do, dlse = make_qkv(B, Hq, Hkv, Nq, Nk, D)
    mask = dense_mask(layout, B, Hq, Nq, Nk, causal=causal, q_start=q_start, k_start=k_start)
    got = run(lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=block_size, causal=causal,
                                                     q_start=q_start, k_start=k_start, return_lse=True, impl="torch"),
              q, k, v, do, dlse)
    want = run(lambda q, k, v: sdpa_reference(q, k, v, mask), q, k, v, do, dlse)
    assert_close(got, want, NAMES)
    return got, mask


@pytest.mark.parametrize("B,Hq,Hkv,Bl,Hl,block_size,D", [
    (2, 4, 4, 1, 4, 16, 32),   # per-head layout (S2)
    (2, 4, 2, 1, 4, 16, 32),   # per-query-head layout with GQA
    (2, 4, 2, 2, 2, 16, 32),   # per-batch, per-KV-group layout (InfLLM-V2)
    (1, 6, 2, 1, 1, 32, 64),   # one layout for all heads
])
def test_random_layout_matches_sdpa(B, Hq, Hkv, Bl, Hl, block_size, D):
    N = 128
    layout = random_layout(Bl, Hl, N // block_size, N // block_size, density=0.5)
    check_against_sdpa(B, Hq, Hkv, N, N, D, layout, block_size)


def test_non_causal_and_rectangular():
    layout = random_layout(1, 2, 4, 6, density=0.6, seed=3)
    check_against_sdpa(1, 2, 2, 64, 96, 32, layout, 16, causal=False)


def test_full_layout_equals_dense_causal():
    q, k, v, do, dlse = make_qkv(2, 4, 2, 128, 128, 32)
    fn = lambda layout: (lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=32, return_lse=True, impl="torch"))
    want = run(lambda q, k, v: (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                torch.zeros(q.shape[:3])), q, k, v, do, torch.zeros_like(dlse))
    for layout in (BlockLayout.full(4, 4), BlockLayout.causal(4, 4)):
        got = run(fn(layout), q, k, v, do, torch.zeros_like(dlse))
        assert_close(got[:1] + got[2:], want[:1] + want[2:], ("out", "dq", "dk", "dv"))


def test_empty_rows_zero_output_neg_inf_lse_finite_grads():
    mask = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[0, 0, 2] = False   # query block 2 of head 0 has no block at all
    mask[0, 1, :, 0] = False
    mask[0, 1, 0] = False   # head 1: query block 0 only sees future blocks -> causally empty
    mask[0, 1, 0, 3] = True
    layout = BlockLayout.from_block_mask(mask)
    (out, lse, dq, dk, dv), m = check_against_sdpa(2, 2, 1, 128, 128, 32, layout, 16)
    empty = ~m.any(-1)
    assert empty[:, 0, 32:48].all() and empty[:, 1, :16].all()
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    assert (dq[empty] == 0).all()
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()


def test_all_empty_layout():
    layout = BlockLayout.from_block_mask(torch.zeros(1, 1, 4, 4, dtype=torch.bool))
    q, k, v, do, dlse = make_qkv(1, 2, 2, 64, 64, 32)
    out, lse, dq, dk, dv = run(lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=16, return_lse=True,
                                                                      impl="torch"), q, k, v, do, dlse)
    assert (out == 0).all() and (lse == float("-inf")).all()
    assert not dq.any() and not dk.any() and not dv.any()


@pytest.mark.parametrize("q_start,k_start", [
    (64, 0),    # query chunk entirely after the key chunk: no causal masking
    (16, 0),    # overlapping chunks, diagonal shifted by one block
    (8, 0),     # shift that is not a multiple of the block size
    (0, 128),   # key chunk after the query chunk: everything masked
])
def test_global_offsets(q_start, k_start):
    layout = random_layout(1, 2, 4, 4, density=0.7, seed=5)
    (out, lse, *_), mask = check_against_sdpa(1, 2, 2, 64, 64, 32, layout, 16, q_start=q_start, k_start=k_start)
    if k_start > q_start + 64:
        assert (out == 0).all() and (lse == float("-inf")).all()


def test_many_query_block_groups(monkeypatch):
    # A tiny group budget forces one query block per group: the grouping and
    # the dK/dV index_add across groups are exercised at a small shape.
    monkeypatch.setattr(block_sparse_cpu, "GROUP_ELEMENTS", 1)
    layout = random_layout(2, 2, 8, 8, density=0.5, seed=7)
    check_against_sdpa(2, 4, 2, 128, 128, 32, layout, 16)


def test_matches_naive_loop():
    B, H, N, D, bs = 1, 2, 48, 8, 16
    layout = random_layout(1, H, 3, 3, density=0.6, seed=11)
    q, k, v, *_ = make_qkv(B, H, H, N, N, D)
    out, lse = block_sparse_attention(q, k, v, layout, block_size=bs, return_lse=True, impl="torch")
    blocks = layout.block_mask()[0]
    for h in range(H):
        for i in range(N):
            keys = [j for j in range(N) if blocks[h, i // bs, j // bs] and j <= i]
            if not keys:
                assert out[0, h, i].abs().max() == 0 and lse[0, h, i] == float("-inf")
                continue
            s = torch.stack([q[0, h, i] @ k[0, h, j] / math.sqrt(D) for j in keys])
            p = torch.softmax(s, 0)
            o = sum(p[t] * v[0, h, j] for t, j in enumerate(keys))
            torch.testing.assert_close(out[0, h, i], o, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[0, h, i], torch.logsumexp(s, 0), rtol=1e-5, atol=1e-5)


PLAIN_SDPA = "SDPA with the explicit mask, run in the half dtype (block_sparse_ref.masked_attention)"
HALF_GRADS = ("out", "dq", "dk", "dv")


def half_precision_check(dtype, fn, plain, q, k, v, do, *, yardstick=PLAIN_SDPA):
    """The criterion of docs/algorithms.md#half-precision-test-criterion (tests/precision.py):
    fn(q, k, v) -> (out, lse) run on q, k, v, do cast to `dtype` against plain(q, k, v) run on
    the same half inputs (the yardstick) and plain on the fp32 inputs (the reference); out
    within 2x, dq, dk, dv within 3x the yardstick's max abs error. dlse is 0 (the yardstick's
    lse is computed in fp32 anyway). Returns {name: (error, plain error)}."""
    zero = torch.zeros(q.shape[:3])
    half = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    pick = lambda r: dict(zip(HALF_GRADS, (r[0], *r[2:])))
    want = pick(run(plain, *fp32, do.float(), zero))
    base = pick(run(plain, *half, do.to(dtype), zero))
    got = pick(run(fn, *half, do.to(dtype), zero))
    assert got["out"].dtype == dtype and all(got[n].dtype == dtype for n in ("dq", "dk", "dv"))
    return assert_half_precision(got, base, want, yardstick=yardstick)


def half_precision_errors(dtype, fn, q_doc=None, k_doc=None):
    """half_precision_check of fn(q, k, v, layout, **docs) on a random per-head GQA block layout
    (B 1, or q_doc's rows, Hq 4, Hkv 2, N 64, D 32, blocks of 16); plain: SDPA with the layout's
    explicit mask (and document ids q_doc / k_doc [B, 64], given) run in `dtype`."""
    B = 1 if q_doc is None else q_doc.shape[0]
    layout = random_layout(1, 4, 4, 4, density=0.6, seed=13)
    q, k, v, do, _ = make_qkv(B, 4, 2, 64, 64, 32)
    docs = {} if q_doc is None else dict(q_doc=q_doc, k_doc=k_doc)
    mask = dense_mask(layout, B, 4, 64, 64, **docs)
    return half_precision_check(dtype, lambda q, k, v: fn(q, k, v, layout, **docs),
                                lambda q, k, v: sdpa_reference(q, k, v, mask), q, k, v, do)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_sdpa_error(dtype):
    """The CPU path in bf16 / fp16 (computes in fp32 inside); plain: SDPA with the explicit mask,
    run in `dtype`; reference: the same SDPA in fp32."""
    half_precision_errors(dtype, lambda q, k, v, layout: block_sparse_attention(q, k, v, layout, block_size=16,
                                                                               return_lse=True, impl="torch"))


# ---- packed documents (q_doc / k_doc) ---------------------------------------

# Document lengths of the packed rows of the doc tests (N = 64, blocks of 16): documents shorter
# than a block (5, 1, 6), boundaries inside blocks and on one (row 1: 16 + 16), a document spanning blocks.
DOC_LENGTHS = ([5, 37, 16, 6], [16, 16, 1, 31])


def doc_ids(lengths_per_row=DOC_LENGTHS) -> torch.Tensor:
    """int64 [B, N] non-decreasing document ids of packed rows with these document lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row])


def check_docs_against_reference(fn, B, Hq, Hkv, Nq, Nk, D, layout, q_doc, k_doc, *, causal=True, q_start=0,
                                 k_start=0, seed=0, rtol=1e-5, atol=1e-5):
    """fn(q, k, v, layout, causal=, q_start=, k_start=, q_doc=, k_doc=) -> (out, lse) against the oracle
    with the same documents, forward and gradients."""
    q, k, v, do, dlse = make_qkv(B, Hq, Hkv, Nq, Nk, D, seed=seed)
    kw = dict(causal=causal, q_start=q_start, k_start=k_start, q_doc=q_doc, k_doc=k_doc)
    got = run(lambda q, k, v: fn(q, k, v, layout, **kw), q, k, v, do, dlse)
    want = run(lambda q, k, v: block_sparse_reference(q, k, v, layout, **kw), q, k, v, do, dlse)
    assert_close(got, want, NAMES, rtol=rtol, atol=atol)
    return got


def own_document_token_layout(docs: torch.Tensor, block_size: int) -> BlockLayout:
    """Token layout [B, 1, N, M]: each token lists exactly the causal key blocks that hold a token of
    its document, so tokens of a block that spans a boundary select differently."""
    B, N = docs.shape
    holds = (docs[:, :, None, None] == docs.view(B, 1, N // block_size, block_size)).any(-1)  # [B, N, M]
    causal = torch.arange(N // block_size)[None, :] * block_size <= torch.arange(N)[:, None]
    return BlockLayout.from_block_mask((holds & causal)[:, None])


def check_packed_row_equals_documents_alone(fn, Hq, Hkv, D, block_size, lengths_per_row=DOC_LENGTHS, *,
                                            token_layout=False, atol=1e-5):
    """Each document of a packed row gets the outputs and gradients of its own row, run alone from
    position 0 with the dense causal layout (padded after its end to whole blocks: causal, so the
    padding is seen by no token of the document, and its zero do / dlse gives it no gradient). The
    packed row runs with the dense causal layout, or (token_layout) with each token's own
    document's blocks as a token layout."""
    docs = doc_ids(lengths_per_row)
    B, N = docs.shape
    q, k, v, do, dlse = make_qkv(B, Hq, Hkv, N, N, D)
    m = N // block_size
    layout = own_document_token_layout(docs, block_size) if token_layout else BlockLayout.causal(m, m)
    packed = run(lambda q, k, v: fn(q, k, v, layout, block_size=block_size, q_doc=docs, k_doc=docs), q, k, v, do,
                 dlse)
    for b, lengths in enumerate(lengths_per_row):
        start = 0
        for length in lengths:
            n = -(-length // block_size) * block_size
            own = slice(start, start + length)
            pad = lambda x: F.pad(x[b:b + 1, :, own].detach(), (0, 0, 0, n - length)) if x.dim() == 4 else \
                F.pad(x[b:b + 1, :, own], (0, n - length))
            alone = run(lambda q, k, v: fn(q, k, v, BlockLayout.causal(n // block_size, n // block_size),
                                           block_size=block_size),
                        *(pad(t).requires_grad_() for t in (q, k, v)), pad(do), pad(dlse))
            for got, want, name in zip(packed, alone, NAMES):
                torch.testing.assert_close(got[b:b + 1, :, own], want[:, :, :length], rtol=1e-5, atol=atol,
                                           msg=lambda msg: f"{name}, row {b}, document at {start}: {msg}")
            start += length


def cpu(q, k, v, layout, block_size=16, **kw):
    return block_sparse_attention(q, k, v, layout, block_size=block_size, return_lse=True, impl="torch", **kw)


@pytest.mark.parametrize("Hq,Hkv,Bl,Hl", [(4, 2, 1, 4), (4, 2, 2, 2), (2, 2, 1, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_documents_match_the_reference(Hq, Hkv, Bl, Hl, causal):
    layout = random_layout(Bl, Hl, 4, 4, density=0.7, seed=Hq + Bl)
    docs = doc_ids()
    check_docs_against_reference(cpu, 2, Hq, Hkv, 64, 64, 32, layout, docs, docs, causal=causal)


def test_documents_with_global_offsets_and_rectangular_chunks():
    """A ring tile: queries 32..63 of the row against keys 0..47, each with its slice of the ids."""
    docs = doc_ids()
    layout = random_layout(1, 2, 2, 3, density=0.8, seed=4)
    check_docs_against_reference(cpu, 2, 2, 1, 32, 48, 32, layout, docs[:, 32:], docs[:, :48], q_start=32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_documents_half_precision_within_sdpa_error(dtype):
    """Packed documents (q_doc / k_doc: boundaries inside blocks, the mixed pairs' token masks) in
    bf16 / fp16; plain: SDPA with the explicit layout-and-document mask, run in `dtype`."""
    docs = doc_ids()
    half_precision_errors(dtype, lambda q, k, v, layout, **kw: cpu(q, k, v, layout, **kw), docs, docs)


@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2)])
def test_packed_row_equals_each_document_alone(Hq, Hkv):
    check_packed_row_equals_documents_alone(cpu, Hq, Hkv, 32, 16)
    check_packed_row_equals_documents_alone(cpu, Hq, Hkv, 32, 32)


def test_queries_seeing_no_key_of_their_document():
    """Queries of documents 1 and 2 against keys of document 0 only: o = 0, lse = -inf, zero gradients."""
    q_doc, k_doc = torch.tensor([[1] * 16 + [2] * 16]), torch.zeros(1, 32, dtype=torch.int64)
    out, lse, dq, dk, dv = check_docs_against_reference(cpu, 1, 2, 1, 32, 32, 32, BlockLayout.full(2, 2), q_doc,
                                                        k_doc, q_start=32)
    assert (out == 0).all() and (lse == float("-inf")).all()
    assert not dq.any() and not dk.any() and not dv.any()


def test_doc_split_keeps_every_pair_that_can_meet_and_masks_only_mixed_ones():
    docs = doc_ids()
    layout = random_layout(1, 2, 4, 4, density=0.8, seed=6)
    clean, mixed = block_sparse_cpu.doc_split(layout, docs, docs, block_size=16, causal=True, q_start=0, k_start=0)
    same = (docs[:, :, None] == docs[:, None, :]) & torch.ones(64, 64, dtype=torch.bool).tril()
    meets = same.view(2, 4, 16, 4, 16).any(4).any(2)[:, None] & layout.block_mask()   # [B, Hl, Mq, Mk]
    one_doc = (docs[:, ::16] == docs[:, 15::16])
    single = one_doc[:, :, None] & one_doc[:, None, :] & (docs[:, None, ::16] == docs[:, ::16, None])
    c, x = clean.block_mask(), mixed.block_mask()
    assert not (c & x).any()
    assert torch.equal(c, meets & single[:, None])   # one common document: no token mask
    assert torch.equal((c | x) & meets, meets)      # no pair with a visible key is dropped
    dropped = layout.block_mask() & ~(c | x)
    assert dropped.any() and not (dropped & meets).any()


def test_invisible_documents_are_skipped_not_masked():
    """NaN in document 1 never reaches document 2: the pairs are skipped before anything is read
    (a masked NaN would still give 0 * NaN = NaN in p @ v)."""
    check_invisible_documents_are_skipped(cpu, block_size=16)
    check_invisible_documents_are_skipped(cpu, block_size=16, token_layout=True)


def check_invisible_documents_are_skipped(fn, block_size, token_layout=False):
    """Documents 0, 1, 2 at tokens 0..15, 16..31, 32..63, NaN in document 1's q, k, v and do, a layout
    (block, or token) listing every block, future ones too: document 2's outputs and gradients are
    those of clean inputs, so no tile pair of documents 1 and 2 was loaded, in the forward (K/V),
    dq (K/V) or dK/dV (q, do). Document 1 is not block 0, which a Triton tile running past its
    list's end reads, masked."""
    docs = torch.tensor([[0] * 16 + [1] * 16 + [2] * 32])
    q, k, v, do, dlse = make_qkv(1, 2, 1, 64, 64, 32)
    m = 64 // block_size
    layout = BlockLayout.from_block_mask(torch.ones(1, 1, 64 if token_layout else m, m, dtype=torch.bool))
    call = lambda q, k, v: fn(q, k, v, layout, block_size=block_size, q_doc=docs, k_doc=docs)
    clean = run(call, q, k, v, do, dlse)
    poisoned = [t.detach().clone() for t in (q, k, v, do)]
    for t in poisoned:
        t[:, :, 16:32] = float("nan")
    got = run(call, *(t.requires_grad_() for t in poisoned[:3]), poisoned[3], dlse)
    for g, c, name in zip(got, clean, NAMES):
        torch.testing.assert_close(g[:, :, 32:], c[:, :, 32:], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
