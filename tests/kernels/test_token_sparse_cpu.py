"""The CPU path for token layouts (kernels/token_sparse_cpu.py, reached through
block_sparse_attention with impl="torch") against SDPA with the explicit
token-level mask of the selection, forward and gradients."""

import pytest
import torch

from ltrain.kernels import BlockLayout, block_sparse_attention
from ltrain.kernels.token_sparse_cpu import split
from tests.kernels.test_block_sparse_cpu import (NAMES, assert_close, check_docs_against_reference,
                                                 check_packed_row_equals_documents_alone, cpu, dense_mask, doc_ids,
                                                 half_precision_check, make_qkv, own_document_token_layout, run,
                                                 sdpa_reference)


def token_layout(Bl, Hl, Nq, Mk, K, block_size, *, shared=0.7, drop=0.2, seed=0):
    """Random per-token selections of K of Mk blocks; `shared` weights a score
    common to a query block (tokens of a block then mostly agree, as trained
    queries do), `drop` empties slots (-1) so counts vary, some rows to 0."""
    g = torch.Generator().manual_seed(seed)
    common = torch.rand(Bl, Hl, Nq // block_size, Mk, generator=g).repeat_interleave(block_size, 2)
    scores = shared * common + (1 - shared) * torch.rand(Bl, Hl, Nq, Mk, generator=g)
    idx = scores.topk(K, -1).indices
    idx = torch.where(torch.rand(Bl, Hl, Nq, K, generator=g) < drop, -1, idx)
    idx[..., 3, :] = -1  # one token of every head selects nothing: o 0, lse -inf
    return BlockLayout.from_indices(idx, Mk)


CASES = [
    # B, Hq, Hkv, Nq, Nk, D, block_size, Hl, Bl, q_start, k_start, causal
    (2, 4, 2, 64, 64, 32, 16, 2, 2, 0, 0, True),
    (1, 4, 1, 64, 128, 32, 16, 1, 1, 64, 0, True),
    (2, 8, 2, 128, 128, 16, 32, 1, 1, 0, 0, True),
    (1, 16, 1, 64, 64, 32, 16, 1, 1, 0, 0, True),
    (2, 2, 2, 64, 64, 32, 16, 2, 1, 0, 0, True),
    (1, 2, 2, 32, 64, 32, 16, 2, 1, 0, 0, False),
]


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,bs,Hl,Bl,q_start,k_start,causal", CASES)
def test_matches_sdpa_with_the_token_mask(B, Hq, Hkv, Nq, Nk, D, bs, Hl, Bl, q_start, k_start, causal):
    layout = token_layout(Bl, Hl, Nq, Nk // bs, 3, bs, seed=Nq + Hq)
    q, k, v, do, dlse = make_qkv(B, Hq, Hkv, Nq, Nk, D)
    mask = dense_mask(layout, B, Hq, Nq, Nk, causal=causal, q_start=q_start, k_start=k_start)
    got = run(lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=bs, causal=causal, q_start=q_start,
                                                     k_start=k_start, return_lse=True, impl="torch"),
              q, k, v, do, dlse)
    want = run(lambda q, k, v: sdpa_reference(q, k, v, mask), q, k, v, do, dlse)
    assert_close(got, want, NAMES)
    assert (got[0][:, :, 3] == 0).all() and (got[1][:, :, 3] == float("-inf")).all()


@pytest.mark.parametrize("shared", [0.0, 0.7, 1.0])
def test_split_puts_every_selected_block_in_exactly_one_part(shared):
    layout = token_layout(2, 2, 128, 8, 4, 16, shared=shared, seed=3)
    common, rest = split(layout, 16)
    per_token = layout.block_mask()
    from_common = common.block_mask().repeat_interleave(16, 2)
    from_rest = rest.block_mask()
    assert not (from_common & from_rest).any()
    assert torch.equal(from_common | from_rest, per_token)
    if shared == 1.0:  # tokens of a block agree except the blank token 3 and dropped slots
        assert rest.counts.float().mean() < layout.counts.float().mean()


def test_agreeing_tokens_reduce_to_the_block_layout():
    """A token layout whose tokens all repeat their block's row equals the block layout, bit for bit."""
    block = BlockLayout.from_block_mask(torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(5)) < 0.6)
    tokens = BlockLayout(block.counts.repeat_interleave(16, 2), block.indices.repeat_interleave(16, 2), 4)
    q, k, v, do, dlse = make_qkv(1, 4, 2, 64, 64, 32)
    fn = lambda lay: (lambda q, k, v: block_sparse_attention(q, k, v, lay, block_size=16, return_lse=True, impl="torch"))
    for a, b, name in zip(run(fn(tokens), q, k, v, do, dlse), run(fn(block), q, k, v, do, dlse), NAMES):
        assert torch.equal(a, b), name


def test_rejects_a_per_query_head_token_layout():
    q, k, v, *_ = make_qkv(1, 4, 2, 32, 32, 16)
    layout = token_layout(1, 4, 32, 2, 1, 16)
    with pytest.raises(ValueError, match="token layout is shared by the query heads of a KV group"):
        block_sparse_attention(q, k, v, layout, block_size=16, impl="torch")


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,bs,Hl,Bl,q_start,k_start,causal", [CASES[0], CASES[1], CASES[3], CASES[5]])
def test_documents_match_the_reference(B, Hq, Hkv, Nq, Nk, D, bs, Hl, Bl, q_start, k_start, causal):
    layout = token_layout(Bl, Hl, Nq, Nk // bs, 3, bs, seed=Nq + Hq)
    docs = doc_ids().repeat(1, 2)[:B].sort(-1).values  # 128 ids: slices for the rectangular cases
    check_docs_against_reference(lambda *a, **kw: cpu(*a, block_size=bs, **kw), B, Hq, Hkv, Nq, Nk, D, layout,
                                 docs[:, q_start:q_start + Nq], docs[:, k_start:k_start + Nk], causal=causal,
                                 q_start=q_start, k_start=k_start)


@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2)])
def test_packed_row_with_own_document_selections_equals_each_document_alone(Hq, Hkv):
    """Each token selects its own document's blocks (a boundary block's tokens disagree: the rest part)."""
    assert split(own_document_token_layout(doc_ids(), 16), 16)[1].counts.any()
    check_packed_row_equals_documents_alone(cpu, Hq, Hkv, 32, 16, token_layout=True)


def token_half_precision_errors(dtype, fn, docs=None):
    """half_precision_check of fn(q, k, v, layout, **docs) on a random token layout per batch and KV
    group (B 2, Hq 4, Hkv 2, N 64, D 32, blocks of 16, 3 picks of 4: common and rest parts both
    used); plain: SDPA with the selection's explicit token mask (and documents) run in `dtype`."""
    layout = token_layout(2, 2, 64, 4, 3, 16, shared=0.9, drop=0.05, seed=21)
    assert split(layout, 16)[0].counts.any() and split(layout, 16)[1].counts.any()
    q, k, v, do, _ = make_qkv(2, 4, 2, 64, 64, 32, seed=21)
    kw = {} if docs is None else dict(q_doc=docs, k_doc=docs)
    mask = dense_mask(layout, 2, 4, 64, 64, **kw)
    return half_precision_check(dtype, lambda q, k, v: fn(q, k, v, layout, **kw),
                                lambda q, k, v: sdpa_reference(q, k, v, mask), q, k, v, do)


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_sdpa_error(dtype, docs):
    """The token-sparse CPU path in bf16 / fp16 (fp32 inside: both parts and their lse merge),
    with and without packed documents; plain: SDPA with the explicit token mask, run in `dtype`;
    reference: the same SDPA in fp32."""
    token_half_precision_errors(dtype, cpu, doc_ids() if docs else None)
