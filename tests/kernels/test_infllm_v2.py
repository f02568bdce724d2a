"""InfLLM-V2 selection (PyTorch path) against the naive per-token reference,
and the switchable attention against dense attention."""

import pytest
import torch
import torch.nn.functional as F

from ltrain.kernels import infllm_v2_attention, infllm_v2_select
from ltrain.kernels import infllm_v2_ref
from ltrain.kernels.infllm_v2_ref import block_scores_torch, compress_keys, pool_geometry, select_naive

CPU = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=4, init_blocks=1, window_size=32)


def qk(B=2, Hq=4, Hkv=2, Nq=256, Nk=256, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, Nq, D, generator=g), torch.randn(B, Hkv, Nk, D, generator=g)


def test_pool_geometry_is_the_papers_max_pool():
    """kernel 5, stride 4, padding 1 at the public 32 / 16 / 64 (REFERENCES.md)."""
    S, P = pool_geometry(32, 16, 64)
    assert (S + P, S, P) == (5, 4, 1)


@pytest.mark.parametrize("params", [CPU, dict(CPU, kernel_size=12, init_blocks=2, window_size=48, topk=6),
                                    dict(CPU, kernel_size=4, kernel_stride=4, topk=5)])
def test_granularity_one_equals_naive_per_token_reference(params):
    q, k = qk()
    layout = infllm_v2_select(q, k, granularity=1, impl="torch", **params)
    assert layout.counts.shape == (2, 2, 256)
    assert torch.equal(layout.block_mask(), select_naive(q, k, **params))


def test_query_offset_and_short_query_chunk():
    q, k = qk(Nq=64, Nk=256)
    layout = infllm_v2_select(q, k, granularity=1, q_start=192, impl="torch", **CPU)
    assert torch.equal(layout.block_mask(), select_naive(q, k, q_start=192, **CPU))


def test_block_granular_scores_are_the_max_over_the_blocks_tokens(monkeypatch):
    """Query chunking (forced small here) changes the scores only by rounding."""
    q, k = qk()
    kc = compress_keys(k, 8, 4)
    opts = dict(num_k_blocks=16, kernel_size=8, kernel_stride=4, block_size=16)
    per_token = block_scores_torch(q, kc, granularity=1, **opts)
    monkeypatch.setattr(infllm_v2_ref, "CHUNK_ELEMENTS", 1)
    per_block = block_scores_torch(q, kc, granularity=16, **opts)
    torch.testing.assert_close(per_block, per_token.unflatten(2, (16, 16)).amax(3), atol=1e-6, rtol=1e-6)


def test_block_layout_keeps_forced_blocks_and_k_slots():
    q, k = qk()
    layout = infllm_v2_select(q, k, impl="torch", **CPU)
    mask = layout.block_mask()  # [B, Hkv, 16, 16]
    i = torch.arange(16)[:, None]
    j = torch.arange(16)
    forced = ((j == 0) | ((j >= i - 2) & (j <= i)))
    assert (mask | ~forced).all() and not (mask & (j > i)).any()
    assert torch.equal(layout.counts, torch.minimum(i[:, 0] + 1, torch.tensor(6)).int().expand(2, 2, 16))


def sparse_vs_dense(dtype=torch.float32, **params):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 128, 32, generator=g, dtype=dtype).requires_grad_() for h in (4, 2, 2))
    do = torch.randn(2, 4, 128, 32, generator=g, dtype=dtype)
    out, stats = infllm_v2_attention(q, k, v, **params)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    return out, ref, grads, ref_grads, stats


def test_topk_covering_every_block_equals_dense_forward_and_gradients():
    out, ref, grads, ref_grads, stats = sparse_vs_dense(**dict(CPU, topk=8, dense_len=64))
    assert stats == {"mode": "sparse", "block_fraction": 1.0}
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


def test_short_sequence_is_bit_identical_dense():
    out, ref, grads, ref_grads, stats = sparse_vs_dense(**dict(CPU, dense_len=128))
    assert stats["mode"] == "dense"
    assert torch.equal(out, ref) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_sparse_mode_reports_fraction_and_differs_from_dense():
    out, ref, grads, _, stats = sparse_vs_dense(**dict(CPU, dense_len=64))
    # 8 query blocks, k = 6 slots: 1+2+3+4+5+6+6+6 of 36 causal pairs.
    assert stats == {"mode": "sparse", "block_fraction": 33 / 36}
    assert not torch.allclose(out, ref) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("key,value,match", [
    ("topk", 2, "topk=2 is smaller than the forced blocks"),
    ("kernel_stride", 16, "kernel_stride=16 is larger than kernel_size=8"),
    ("block_size", 24, "block_size=24 is not a multiple of kernel_stride=16"),
    ("window_size", 8, "window_size=8 is smaller than block_size=16"),
    ("block_size", 48, "block_size=48 must be one of"),
    ("init_blocks", -1, "init_blocks=-1 must be a non-negative integer"),
])
def test_bad_parameters(key, value, match):
    params = dict(CPU, **{key: value})
    if key == "block_size" and value == 24:
        params.update(kernel_size=16, kernel_stride=16)
    q, k = qk(Nq=64, Nk=64)
    with pytest.raises(ValueError, match=match):
        infllm_v2_select(q, k, **params)


def test_bad_shapes():
    q, k = qk(Nq=72, Nk=72)
    with pytest.raises(ValueError, match="multiples of block_size=16"):
        infllm_v2_select(q, k, **CPU)
    q, k = qk()
    with pytest.raises(ValueError, match="granularity=3"):
        infllm_v2_select(q, k, granularity=3, **CPU)
