"""Triton kernel (forward, lse, dq, dk, dv) against the oracle (kernels/block_sparse_ref.py).
Without a GPU it runs in the Triton interpreter (tests/kernels/conftest.py
sets TRITON_INTERPRET=1), so shapes stay small."""

import pytest
import torch

from ltrain.kernels import BlockLayout, block_sparse_attention
from ltrain.kernels import block_sparse_triton as bst
from ltrain.kernels.aot import ARCHS
from ltrain.kernels.block_sparse_ref import block_sparse_reference
from tests.kernels.test_block_sparse_cpu import (NAMES, assert_close, check_docs_against_reference,
                                                 check_invisible_documents_are_skipped,
                                                 check_packed_row_equals_documents_alone, doc_ids,
                                                 half_precision_errors, make_qkv, random_layout, run)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def compare(B, Hq, Hkv, Nq, Nk, D, layout, block_size, **kw):
    q, k, v, do, dlse = (t.to(DEVICE) for t in make_qkv(B, Hq, Hkv, Nq, Nk, D))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    layout = layout.to(DEVICE)
    got = run(lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=block_size, return_lse=True,
                                                     impl="triton", **kw), q, k, v, do, dlse)
    assert_close(got, run(lambda q, k, v: block_sparse_reference(q, k, v, layout, **kw), q, k, v, do, dlse), NAMES)
    return got


def test_per_head_layout_gqa_with_empty_rows():
    mask = torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[0, 1, 2] = False
    out, lse, *grads = compare(2, 4, 2, 64, 64, 32, BlockLayout.from_block_mask(mask), 16)
    assert (out[:, 1, 32:48] == 0).all() and (lse[:, 1, 32:48] == float("-inf")).all()
    assert all(torch.isfinite(g).all() for g in grads)


def test_per_batch_per_kv_group_layout():
    compare(2, 4, 2, 128, 128, 64, random_layout(2, 2, 4, 4, density=0.6, seed=1), 32)


@pytest.mark.parametrize("q_start,k_start", [(40, 0), (0, 64)])
def test_global_offsets_shared_layout(q_start, k_start):
    out, lse, *_ = compare(1, 2, 1, 64, 64, 32, random_layout(1, 1, 4, 4, density=0.7, seed=2), 16,
                           q_start=q_start, k_start=k_start)
    if k_start > q_start + 63:
        assert (out == 0).all() and (lse == float("-inf")).all()


def test_non_causal_rectangular():
    compare(1, 2, 2, 32, 64, 32, random_layout(1, 2, 2, 4, density=0.6, seed=3), 16, causal=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_sdpa_error(dtype):
    """The Triton kernel in bf16 / fp16 (fp32 softmax state and dq / dK / dV accumulators); plain:
    SDPA with the explicit mask, run in `dtype`; reference: the same SDPA in fp32."""
    half_precision_errors(dtype, triton_impl)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_documents_half_precision_within_sdpa_error(dtype):
    """Packed documents (q_doc / k_doc, boundaries inside blocks) in bf16 / fp16; plain: SDPA with
    the explicit layout-and-document mask, run in `dtype`. The interpreter's bf16 stores truncate
    (a GPU rounds to nearest), which alone can double the output error: measured 1.6x here."""
    docs = doc_ids()
    half_precision_errors(dtype, triton_impl, docs, docs)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_tiles_of_each_arch_at_head_dim_128(arch, monkeypatch):
    """Each arch's 16-bit tiles at block 64, head dim 128 (sm_80: 32-key dq tiles and 32-query dk/dv
    tiles inside a block; sm_90: whole blocks), causal, so tiles on, above and below the diagonal."""
    monkeypatch.setattr(bst, "launch_arch", lambda q: arch)
    layout = random_layout(1, 2, 2, 2, density=0.9, seed=5).to(DEVICE)
    q, k, v, do, dlse = (t.to(DEVICE) for t in make_qkv(1, 2, 1, 128, 128, 128, dtype=torch.bfloat16, seed=5))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    got = run(lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=64, return_lse=True, impl="triton"),
              q, k, v, do, dlse)
    want = run(lambda q, k, v: block_sparse_reference(q.float(), k.float(), v.float(), layout), q, k, v, do, dlse)
    assert_close(got, want, NAMES, rtol=3e-2, atol=3e-2)


def triton_impl(q, k, v, layout, block_size=16, q_doc=None, k_doc=None, **kw):
    """block_sparse_attention with impl="triton" on DEVICE, results back on the CPU (block or token layout)."""
    docs = {} if q_doc is None else dict(q_doc=q_doc.to(DEVICE), k_doc=k_doc.to(DEVICE))
    out, lse = block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), layout.to(DEVICE),
                                      block_size=block_size, return_lse=True, impl="triton", **docs, **kw)
    return out.cpu(), lse.cpu()


def test_documents_match_the_reference_gqa_per_head_layout():
    docs = doc_ids()
    layout = random_layout(1, 4, 4, 4, density=0.7, seed=7)
    check_docs_against_reference(triton_impl, 2, 4, 2, 64, 64, 32, layout, docs, docs)


def test_documents_in_a_ring_tile():
    """Queries 32..63 against keys 0..47 (rectangular, global offsets), each with its slice of the ids."""
    docs = doc_ids()
    check_docs_against_reference(triton_impl, 2, 2, 1, 32, 48, 32, random_layout(2, 1, 2, 3, density=0.8, seed=8),
                                 docs[:, 32:], docs[:, :48], q_start=32)


def test_packed_row_equals_each_document_alone():
    check_packed_row_equals_documents_alone(triton_impl, 2, 1, 32, 16)


def test_invisible_documents_are_skipped_not_masked():
    """NaN K/V of one document never reach a later document's outputs or gradients: its key tiles
    are skipped before they are loaded (a masked NaN would give 0 * NaN = NaN)."""
    check_invisible_documents_are_skipped(triton_impl, block_size=16)
