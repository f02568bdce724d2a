"""Token-granular sparse attention kernel (kernels/token_sparse_triton.py)
against plain dense math with an explicit token-level mask. Without a GPU it
runs in the Triton interpreter (tests/kernels/conftest.py), so shapes stay small."""

import math

import pytest
import torch

from ltrain.kernels import BlockLayout
from ltrain.kernels import token_sparse_triton as tst
from tests.kernels.test_block_sparse_cpu import (NAMES, assert_close, check_docs_against_reference,
                                                 check_invisible_documents_are_skipped,
                                                 check_packed_row_equals_documents_alone, doc_ids, make_qkv, run,
                                                 sdpa_reference, HALF_GRADS, PLAIN_SDPA)
from tests.kernels.test_block_sparse_triton import triton_impl
from tests.precision import assert_half_precision

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class TokenSparseAttention(torch.autograd.Function):
    """forward/backward of the module, with delta = rowsum(do * o) - dlse as the dispatcher forms it."""

    @staticmethod
    def forward(ctx, q, k, v, layout, opts):
        out, lse = tst.forward(q, k, v, layout, **opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.opts = layout, opts
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        delta = (dout.float() * out.float()).sum(-1) - dlse
        grads = tst.backward(dout.contiguous(), q, k, v, lse, delta.contiguous(), ctx.layout, **ctx.opts)
        return (*grads, None, None)


def kernel_fn(layout, block_size, causal=True, q_start=0, k_start=0, sm_scale=None):
    def fn(q, k, v):
        opts = dict(block_size=block_size, causal=causal, q_start=q_start, k_start=k_start,
                    sm_scale=sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1]))
        out, lse = TokenSparseAttention.apply(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), layout.to(DEVICE), opts)
        return out.cpu(), lse.cpu()
    return fn


def token_layout(Bl, Hl, Nq, Mk, block_size, *, width=3, causal=True, q_start=0, k_start=0, seed=0):
    """Random per-token selections of up to `width` blocks, mostly among the token's causal
    blocks: some slots dropped (-1), ~10% of tokens with no block, ~10% picking
    from all blocks (future ones are listed but invisible)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(Bl, Hl, Nq, Mk, generator=g)
    visible = (k_start + torch.arange(Mk) * block_size)[None, :] <= (q_start + torch.arange(Nq))[:, None]
    anywhere = (torch.rand(Bl, Hl, Nq, 1, generator=g) < 0.1) | (not causal)
    vals, idx = torch.where(visible | anywhere, r, -1.0).topk(min(width, Mk), dim=-1)
    keep = (vals >= 0) & (torch.rand(vals.shape, generator=g) > 0.25) & (torch.rand(Bl, Hl, Nq, 1, generator=g) > 0.1)
    return BlockLayout.from_indices(torch.where(keep, idx, -1), Mk)


def token_mask(layout, B, Hq, Nk, block_size, *, causal=True, q_start=0, k_start=0):
    """bool [B, Hq, Nq, Nk]: key j's block selected by token i (of i's KV group), and visible."""
    m = layout.block_mask().repeat_interleave(block_size, dim=-1)
    m = m.expand(B, -1, -1, -1).repeat_interleave(Hq // m.shape[1], dim=1)
    if causal:
        Nq = m.shape[2]
        m = m & ((k_start + torch.arange(Nk))[None, :] <= (q_start + torch.arange(Nq))[:, None])
    return m


def oracle(q, k, v, mask, sm_scale=None, dtype=torch.float64):
    """Dense masked softmax attention computed in `dtype`; empty rows give out 0, lse -inf."""
    G = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.repeat_interleave(G, 1).to(dtype), v.repeat_interleave(G, 1).to(dtype)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return (p @ v).float(), lse.float()


def compare(B, Hq, Hkv, Nq, Nk, D, block_size, Bl, Hl, *, causal=True, q_start=0, k_start=0, seed=0, layout=None):
    if layout is None:
        layout = token_layout(Bl, Hl, Nq, Nk // block_size, block_size, causal=causal, q_start=q_start,
                              k_start=k_start, seed=seed)
    q, k, v, do, dlse = make_qkv(B, Hq, Hkv, Nq, Nk, D, seed=seed)
    pos = dict(causal=causal, q_start=q_start, k_start=k_start)
    mask = token_mask(layout, B, Hq, Nk, block_size, **pos)
    got = run(kernel_fn(layout, block_size, **pos), q, k, v, do, dlse)
    want = run(lambda q, k, v: oracle(q, k, v, mask), q, k, v, do, dlse)
    assert_close(got, want, NAMES, rtol=2e-5, atol=2e-5)
    return got, mask, layout


# Queries are the last Nq of Nk positions except in the aligned G = 1 case.
@pytest.mark.parametrize("B,Hq,Hkv,Bl,Hl,Nq,Nk,block_size,D", [
    (1, 2, 2, 1, 2, 48, 48, 16, 32),    # G = 1, q and k aligned
    (2, 4, 2, 2, 2, 32, 48, 16, 32),    # G = 2, per batch and KV group (InfLLM-V2)
    (2, 4, 1, 1, 1, 32, 64, 32, 64),    # G = 4, layout shared over the batch
    (1, 6, 2, 1, 1, 32, 48, 16, 32),    # G = 3 (not a power of two), one layout for both KV groups
    (1, 16, 1, 1, 1, 32, 48, 16, 32),   # G = 16: the head rows fill one tile exactly
])
def test_gqa_ratios_and_layout_broadcast(B, Hq, Hkv, Bl, Hl, Nq, Nk, block_size, D):
    _, _, layout = compare(B, Hq, Hkv, Nq, Nk, D, block_size, Bl, Hl, q_start=Nk - Nq, seed=Hq)
    # The random selections cover empty tokens, several blocks and -1 padding.
    assert (layout.counts == 0).any() and (layout.counts > 1).any() and (layout.indices == -1).any()
    counts = layout.counts
    assert (counts == 0).any() and (counts > 1).any() and (layout.indices == -1).any()


def test_head_chunks_for_a_large_group(monkeypatch):
    # A cap of 16 head rows splits G = 40 into chunks of 16, 16 and 8 (+8 padding rows).
    monkeypatch.setattr(tst, "MAX_BLOCK_H", 16)
    compare(1, 40, 1, 16, 32, 32, 16, 1, 1, q_start=16, seed=3)


def test_group_of_128_heads_one_chunk_per_64():
    compare(1, 128, 1, 16, 32, 32, 16, 1, 1, q_start=16, seed=4)


def test_query_chunk_after_keys():
    # Nq < Nk: the queries are the last 64 of 128 positions (a ring step or a decode-style chunk).
    compare(1, 2, 1, 64, 128, 32, 32, 1, 1, q_start=64, k_start=0, seed=5)


def test_non_causal_rectangular():
    compare(1, 4, 2, 32, 64, 32, 16, 1, 2, causal=False, seed=6)


def test_empty_rows_zero_output_neg_inf_lse_zero_grads():
    # Tokens 0..15 see no key (k_start = 16); token 20 has no block, token 40 only a future one.
    idx = token_layout(1, 1, 64, 4, 16, q_start=0, k_start=16, seed=7).indices.clone()
    idx[0, 0, 20] = -1
    idx[0, 0, 40] = torch.tensor([3, -1, -1])
    layout = BlockLayout.from_indices(idx, 4)
    (out, lse, dq, dk, dv), mask, _ = compare(1, 2, 1, 64, 64, 32, 16, 1, 1, k_start=16, layout=layout)
    empty = ~mask.any(-1)
    assert empty[0, :, :16].all() and empty[0, :, 20].all() and empty[0, :, 40].all()
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all() and (dq[empty] == 0).all()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_reverse_index_lists_each_blocks_tokens_in_order():
    layout = token_layout(2, 3, 48, 4, 16, seed=8)
    offsets, tokens = tst.reverse_index(layout)
    assert offsets.dtype == tokens.dtype == torch.int32 and tokens.numel() == layout.indices.numel()
    sel = layout.block_mask()
    for bl in range(2):
        for hl in range(3):
            for kb in range(4):
                r = (bl * 3 + hl) * 4 + kb
                want = sel[bl, hl, :, kb].nonzero().flatten().tolist()
                assert tokens[offsets[r]:offsets[r + 1]].tolist() == want


def test_backward_is_deterministic():
    layout = token_layout(1, 1, 32, 3, 16, width=3, seed=9).to(DEVICE)
    q, k, v, do, _ = (t.detach().to(DEVICE) for t in make_qkv(1, 4, 1, 32, 48, 32, seed=9))
    opts = dict(block_size=16, causal=True, sm_scale=0.125, q_start=0, k_start=0)
    out, lse = tst.forward(q, k, v, layout, **opts)
    delta = (do * out).sum(-1)
    first, second = (tst.backward(do, q, k, v, lse, delta, layout, **opts) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_sdpa_error(dtype):
    """Yardstick (docs/algorithms.md#half-precision-test-criterion): masked SDPA run in `dtype` (torch's own half-precision
    attention); both errors are max abs against the fp64 oracle."""
    layout = token_layout(1, 1, 48, 3, 16, width=2, seed=10)
    q, k, v, do, _ = make_qkv(1, 4, 1, 48, 48, 32, seed=10)
    mask = token_mask(layout, 1, 4, 48, 16)
    zero = torch.zeros(1, 4, 48)
    half = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    want = run(lambda q, k, v: oracle(q, k, v, mask), q, k, v, do, zero)
    base = run(lambda q, k, v: sdpa_reference(q, k, v, mask), *half, do.to(dtype), zero)
    got = run(kernel_fn(layout, 16), *half, do.to(dtype), zero)
    pick = lambda r: dict(zip(HALF_GRADS, (r[0], *r[2:])))
    assert_half_precision(pick(got), pick(base), pick(want), yardstick=PLAIN_SDPA)


def test_rejects_a_block_layout():
    layout = BlockLayout.causal(4, 4)
    q, k, v, *_ = make_qkv(1, 2, 1, 64, 64, 32)
    with pytest.raises(ValueError, match="token layout"):
        tst.forward(q, k, v, layout, block_size=16, causal=True, sm_scale=0.1, q_start=0, k_start=0)


def test_documents_match_the_reference():
    """Random selections (G = 2, per batch and KV group) of a packed row, queries at 16..63."""
    docs = doc_ids()
    layout = token_layout(2, 2, 48, 4, 16, q_start=16, seed=11)
    check_docs_against_reference(triton_impl, 2, 4, 2, 48, 64, 32, layout, docs[:, 16:], docs, q_start=16,
                                 rtol=2e-5, atol=2e-5)


def test_packed_row_with_own_document_selections_equals_each_document_alone():
    check_packed_row_equals_documents_alone(triton_impl, 2, 1, 32, 16, token_layout=True, atol=2e-5)


def test_invisible_documents_are_skipped_not_masked():
    """NaN in one document's q, k, v, do never reaches another's results: the forward, dq and
    dK/dV loops skip its tiles before loading them."""
    check_invisible_documents_are_skipped(triton_impl, block_size=16, token_layout=True)
