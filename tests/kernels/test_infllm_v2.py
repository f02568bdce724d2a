"""InfLLM-V2 selection (PyTorch path) against the naive per-token reference,
the switchable attention against dense attention, and its causality: no
output depends on a later q, k or v, whatever the GQA ratio."""

import pytest
import torch
import torch.nn.functional as F

from ltrain.kernels import infllm_v2_attention, infllm_v2_select
from ltrain.kernels import infllm_v2, infllm_v2_ref
from ltrain.kernels.infllm_v2_ref import block_scores_torch, compress_keys, pool_geometry, select_naive

CPU = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=4, init_blocks=1, window_size=32)


def qk(B=2, Hq=4, Hkv=2, Nq=256, Nk=256, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, Nq, D, generator=g), torch.randn(B, Hkv, Nk, D, generator=g)


def test_pool_geometry_is_the_papers_max_pool():
    """kernel 5, stride 4, padding 1 at the public 32 / 16 / 64 (docs/algorithms.md#pooling-onto-blocks)."""
    S, P = pool_geometry(32, 16, 64)
    assert (S + P, S, P) == (5, 4, 1)


@pytest.mark.parametrize("lse", ["exact", "coarse"])
@pytest.mark.parametrize("params", [CPU, dict(CPU, kernel_size=12, init_blocks=2, window_size=48, topk=6),
                                    dict(CPU, kernel_size=4, kernel_stride=4, topk=5)])
def test_selection_equals_naive_per_token_reference(params, lse):
    q, k = qk()
    layout = infllm_v2_select(q, k, impl="torch", lse=lse, **params)
    assert layout.counts.shape == (2, 2, 256)
    assert torch.equal(layout.block_mask(), select_naive(q, k, lse=lse, **params))


@pytest.mark.parametrize("lse", ["exact", "coarse"])
def test_query_offset_and_short_query_chunk(lse):
    q, k = qk(Nq=64, Nk=256)
    layout = infllm_v2_select(q, k, q_start=192, impl="torch", lse=lse, **CPU)
    assert torch.equal(layout.block_mask(), select_naive(q, k, q_start=192, lse=lse, **CPU))


def test_query_chunking_does_not_change_the_selection(monkeypatch):
    q, k = qk()
    whole = infllm_v2_select(q, k, impl="torch", **CPU)
    monkeypatch.setattr(infllm_v2, "CHUNK_ELEMENTS", 1)  # one block of queries per chunk
    assert torch.equal(infllm_v2_select(q, k, impl="torch", **CPU).indices, whole.indices)


def test_coarse_lse_is_the_logsumexp_over_the_coarse_windows():
    q, k = qk(Nq=128, Nk=256)
    kc2 = compress_keys(k, 32, 16)
    got = infllm_v2_ref.lse_torch(q, kc2, kernel_size=32, kernel_stride=16, q_start=128)
    pos = torch.arange(128, 256)
    s = torch.einsum("bhid,bhjd->bhij", q, kc2.repeat_interleave(2, 1)) / 32 ** 0.5
    s = s.masked_fill(~(torch.arange(kc2.shape[2]) * 16 + 31 <= pos[:, None]), float("-inf"))
    torch.testing.assert_close(got, torch.logsumexp(s, -1))


def test_token_layout_keeps_forced_blocks_and_k_slots():
    q, k = qk()
    layout = infllm_v2_select(q, k, impl="torch", **CPU)
    mask = layout.block_mask()  # [B, Hkv, 256 tokens, 16 blocks]
    i = torch.arange(256)[:, None] // 16
    j = torch.arange(16)
    forced = ((j == 0) | ((j >= i - 2) & (j <= i)))
    assert (mask | ~forced).all() and not (mask & (j > i)).any()
    assert torch.equal(layout.counts, torch.minimum(i[:, 0] + 1, torch.tensor(6)).int().expand(2, 2, 256))


def _steer(q, k, t, target_block, block_size):
    """q with token t's queries pointed at the mean key of target_block (all heads of each group)."""
    G = q.shape[1] // k.shape[1]
    q = q.clone()
    q[:, :, t] = 8 * k[:, :, target_block * block_size:(target_block + 1) * block_size].mean(2).repeat_interleave(G, 1)
    return q


# The Triton interpreter runs one program per token: its probe stays short.
@pytest.mark.parametrize("G,N,impl", [(G, N, "torch") for G in (1, 2, 4, 16) for N in (256, 512)]
                         + [(1, 128, "triton"), (16, 128, "triton")])
def test_sparse_path_is_causal(G, N, impl):
    """Perturb q (steered towards a distant key block, so the token's selection
    changes), then k and v, at the last token of several query blocks: every
    earlier output stays the same to the bit, and so do the gradients of the
    earlier outputs into the earlier positions."""
    g = torch.Generator().manual_seed(G * N)
    Hkv = 1 if G == 16 else 2
    q = torch.randn(1, G * Hkv, N, 32, generator=g)
    k, v = (torch.randn(1, Hkv, N, 32, generator=g) for _ in range(2))
    do = torch.randn(1, G * Hkv, N, 32, generator=g)

    def run(inputs, t):
        """Outputs, and the gradients of <out[:t], do[:t]> into q, k, v."""
        xs = [x.clone().requires_grad_() for x in inputs]
        out, stats = infllm_v2_attention(*xs, impl=impl, dense_len=64, **CPU)
        assert stats["mode"] == "sparse"
        return out.detach(), torch.autograd.grad((out[:, :, :t] * do[:, :, :t]).sum(), xs)

    steered = 0
    for t in ((N - 1, N // 2 + 15, 9 * 16 + 15) if impl == "torch" else (N - 1,)):
        base, base_grads = run((q, k, v), t)
        sel = infllm_v2_select(q, k, impl=impl, **CPU).indices[:, :, t]
        unpicked = [b for b in range(1, t // 16 - 2) if not (sel == b).any()]  # not init, not local, not picked
        q2 = _steer(q, k, t, unpicked[0] if unpicked else 1, 16)
        steered += not torch.equal(infllm_v2_select(q2, k, impl=impl, **CPU).indices[:, :, t], sel)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t] += 3.0
        v2[:, :, t] -= 3.0
        for inputs in ((q2, k, v), (q, k2, v2)):
            out, grads = run(inputs, t)
            assert torch.equal(out[:, :, :t], base[:, :, :t]), (G, N, t)
            assert not torch.equal(out[:, :, t], base[:, :, t])  # the probe does reach the output
            for a, b in zip(grads, base_grads):
                torch.testing.assert_close(a[:, :, :t], b[:, :, :t], atol=1e-6, rtol=0)
    assert steered, "the steering probe never changed a selection"


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
    # 8 query blocks, k = 6 slots per token: 16 x (1+2+3+4+5+6+6+6) of 16 x 36 causal (token, block) pairs.
    assert stats == {"mode": "sparse", "block_fraction": 33 / 36}
    assert not torch.allclose(out, ref) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("key,value,match", [
    ("topk", 2, "topk=2 is smaller than the forced blocks"),
    ("kernel_stride", 16, "kernel_stride=16 is larger than kernel_size=8"),
    ("block_size", 24, "block_size=24 is not a multiple of kernel_stride=16"),
    ("window_size", 8, "window_size=8 is smaller than block_size=16"),
    ("block_size", 48, "block_size=48 must be one of"),
    ("init_blocks", -1, "init_blocks=-1 must be a non-negative integer"),
    ("lse", "approx", "lse='approx': allowed exact, coarse"),
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
    with pytest.raises(ValueError, match="q_start=8 must be a multiple of block_size=16"):
        infllm_v2_select(q, k, q_start=8, **CPU)
