"""Triton block scores and selection against the PyTorch path. Without a GPU
this runs in the Triton interpreter (tests/kernels/conftest.py), so shapes
stay small."""

import pytest
import torch

from ltrain.kernels import infllm_v2_select
from ltrain.kernels.infllm_v2_ref import block_scores_torch, compress_keys, lse_torch
from ltrain.kernels.infllm_v2_triton import block_scores_triton, lse_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, Hq, Hkv, Nq, Nk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g).to(DEVICE), torch.randn(B, Hkv, Nk, D, generator=g).to(DEVICE))


@pytest.mark.parametrize("shape,params,q_start", [
    ((1, 4, 2, 128, 128, 32), dict(kernel_size=8, kernel_stride=4, block_size=16), 0),
    ((2, 2, 1, 128, 128, 32), dict(kernel_size=8, kernel_stride=4, block_size=16), 0),
    ((1, 3, 1, 64, 256, 24), dict(kernel_size=12, kernel_stride=4, block_size=32), 192),
    ((1, 2, 2, 128, 128, 64), dict(kernel_size=32, kernel_stride=16, block_size=64), 0),
])
def test_scores_match_reference(shape, params, q_start):
    q, k = inputs(*shape)
    kc = compress_keys(k, params["kernel_size"], params["kernel_stride"])
    opts = dict(num_k_blocks=shape[4] // params["block_size"], q_start=q_start, **params)
    torch.testing.assert_close(block_scores_triton(q, kc, **opts), block_scores_torch(q, kc, **opts),
                               atol=1e-5, rtol=1e-5)


def test_coarse_lse_and_scores_match_reference():
    q, k = inputs(1, 4, 2, 128, 256, 32)
    kc, kc2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    lse = lse_triton(q, kc2, kernel_size=32, kernel_stride=16, q_start=128)
    torch.testing.assert_close(lse, lse_torch(q, kc2, kernel_size=32, kernel_stride=16, q_start=128),
                               atol=1e-5, rtol=1e-5)
    opts = dict(num_k_blocks=16, kernel_size=8, kernel_stride=4, block_size=16, q_start=128, lse=lse)
    torch.testing.assert_close(block_scores_triton(q, kc, **opts), block_scores_torch(q, kc, **opts),
                               atol=1e-5, rtol=1e-5)


def test_selection_matches_reference_away_from_ties():
    """Overlapping pooling windows make exact ties (two blocks sharing their
    best chunk), which rounding may break either way; elsewhere the picks agree."""
    q, k = inputs(2, 4, 2, 128, 128, 32)
    params = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=4, init_blocks=1, window_size=32)
    got = infllm_v2_select(q, k, impl="triton", **params).block_mask()
    want = infllm_v2_select(q, k, impl="torch", **params).block_mask()
    scores = block_scores_torch(q, compress_keys(k, 8, 4), num_k_blocks=8, kernel_size=8, kernel_stride=4,
                                block_size=16)
    q_blk, b = torch.arange(128, device=DEVICE)[:, None] // 16, torch.arange(8, device=DEVICE)
    scores = scores.masked_fill((b == 0) | ((b >= q_blk - 2) & (b <= q_blk)), float("inf"))
    kth = scores.masked_fill(b > q_blk, float("-inf")).topk(7, dim=-1).values
    tied = (kth[..., 5] - kth[..., 6]).abs() < 1e-5  # the 6th and 7th candidates (NaN for inf/inf: not tied)
    assert torch.equal(got[~tied], want[~tied])
    assert tied.float().mean() < 0.1


def test_scores_and_lse_with_documents_match_reference():
    """Packed documents (boundaries inside blocks, one shorter than a summary window):
    the kernels' document compare equals the PyTorch path, exact and coarse lse."""
    from ltrain.kernels.infllm_v2_ref import chunk_docs

    q, k = inputs(2, 4, 2, 128, 256, 32)
    lengths = torch.tensor([[40, 5, 100, 111], [7, 130, 60, 59]])
    doc = torch.stack([torch.repeat_interleave(torch.arange(4), n) for n in lengths]).to(torch.int32).to(DEVICE)
    q_doc = doc[:, 128:]
    kc, kc2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    coarse = dict(kernel_size=32, kernel_stride=16, q_start=128, q_doc=q_doc, kc_doc=chunk_docs(doc, 32, 16))
    lse = lse_triton(q, kc2, **coarse)
    torch.testing.assert_close(lse, lse_torch(q, kc2, **coarse), atol=1e-5, rtol=1e-5)
    for est in (None, lse):
        opts = dict(num_k_blocks=16, kernel_size=8, kernel_stride=4, block_size=16, q_start=128, lse=est,
                    q_doc=q_doc, kc_doc=chunk_docs(doc, 8, 4))
        torch.testing.assert_close(block_scores_triton(q, kc, **opts), block_scores_torch(q, kc, **opts),
                                   atol=1e-5, rtol=1e-5)
