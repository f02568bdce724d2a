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
from ltrain.kernels.block_sparse_ref import masked_attention as sdpa_reference


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


def half_precision_errors(dtype, fn):
    """(error of fn in dtype, error of plain SDPA in dtype), each against fp32
    SDPA, per output; the criterion of docs/algorithms.md#half-precision-test-criterion."""
    layout = random_layout(1, 4, 4, 4, density=0.6, seed=13)
    q, k, v, do, _ = make_qkv(1, 4, 2, 64, 64, 32)
    mask = dense_mask(layout, 1, 4, 64, 64)
    zero = torch.zeros(1, 4, 64)
    half = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    want = run(lambda q, k, v: sdpa_reference(q, k, v, mask), q, k, v, do, zero)
    base = run(lambda q, k, v: sdpa_reference(q, k, v, mask), *half, do.to(dtype), zero)
    got = run(lambda q, k, v: fn(q, k, v, layout), *half, do.to(dtype), zero)
    err = lambda a, b: (a.float() - b.float()).abs().max().item()
    idx = (0, 2, 3, 4)  # out, dq, dk, dv
    return [err(got[i], want[i]) for i in idx], [err(base[i], want[i]) for i in idx]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_sdpa_error(dtype):
    got, base = half_precision_errors(
        dtype, lambda q, k, v, layout: block_sparse_attention(q, k, v, layout, block_size=16, return_lse=True, impl="torch"))
    assert got[0] <= 2 * base[0], (got, base)
    for g, b in zip(got[1:], base[1:]):
        assert g <= 3 * b, (got, base)
