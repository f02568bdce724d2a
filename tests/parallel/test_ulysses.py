"""Ulysses on real gloo ranks vs attention over the full sequence in one process."""

import pytest
import torch
import torch.nn.functional as F

from ltrain.kernels import block_sparse_attention, s2_layout
from ltrain.parallel import CommMeter, gather_sequence, shard_sequence, ulysses_attention
from tests.multiproc import run_ranks

B, HQ, HKV, D, N, BS = 2, 4, 2, 32, 256, 16
S2 = dict(block_size=BS, local_blocks=2, vert_stride=4)


def dense_attn(q, k, v, *, head_start):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def s2_attn(q, k, v, *, head_start):
    """S2 on a head subset: the per-head layout's rows for global heads [head_start, head_start + h)."""
    layout = s2_layout(HQ, q.shape[2], **S2).heads(head_start, q.shape[1])
    return block_sparse_attention(q, k, v, layout, block_size=BS)


ATTN = {"dense": dense_attn, "s2": s2_attn}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ulysses_vs_single_process(rank, world_size):
    g = torch.Generator().manual_seed(7)
    q, do = (torch.randn(B, HQ, N, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, HKV, N, D, generator=g) for _ in range(2))
    results = {}
    for kind, attn_fn in ATTN.items():
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        o_ref = attn_fn(*full, head_start=0)
        o_ref.backward(do)
        for mode in ("zigzag", "contiguous"):
            local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
            with CommMeter() as fwd:
                o = ulysses_attention(*local, attn_fn=attn_fn, group=None, mode=mode)
            with CommMeter() as bwd:
                o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
            gather = [gather_sequence(t, None, mode=mode, dim=2) for t in (o, *(x.grad for x in local))]
            errors = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), gather,
                                                         (o_ref, *(x.grad for x in full)))}
            results[kind, mode] = errors, fwd.snapshot(), bwd.snapshot()
    bad = []
    for hq, hkv in ((world_size + 1, 1), (3 * world_size, 3)):  # query heads, then KV heads, do not fit P
        x, y = torch.zeros(1, hq, 8, 8), torch.zeros(1, hkv, 8, 8)
        try:
            ulysses_attention(x, y, y, attn_fn=dense_attn, group=None)
        except ValueError as exc:
            bad.append(str(exc))
    return results, bad


def _check(world_size):
    # q, k, v and o each cross once per direction; KV heads replicated up to P when fewer.
    elems = (2 * HQ + 2 * max(HKV, world_size)) * B * (N // world_size) * D
    for results, bad in run_ranks(_ulysses_vs_single_process, world_size, timeout=150):
        for (kind, mode), (errors, fwd, bwd) in results.items():
            assert max(errors.values()) < 1e-5, (kind, mode, errors)
            for meter in (fwd, bwd):
                assert meter["all_to_all"] == {"calls": 4, "bytes": elems * 4}
                assert sum(m["calls"] for m in meter.values()) == 4
        assert bad == [f"ulysses_attention: {world_size + 1} query heads are not divisible by the cp degree "
                       f"P = {world_size}",
                       f"ulysses_attention: 3 KV heads neither divide by nor divide the cp degree P = {world_size}"]


def test_ulysses_two_ranks():
    _check(2)


def test_ulysses_four_ranks_replicates_kv_heads():
    _check(4)


# ---- packed documents ----------------------------------------------------

def packed_docs(lengths, B):
    """int32 [B, sum(lengths)] document ids; row b's documents rotated by b (rows differ)."""
    rows = [torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths[b:] + lengths[:b]))
            for b in range(B)]
    return torch.stack(rows).to(torch.int32)


DOC_LENGTHS = [40, 5, 100, 111]  # boundaries inside blocks and across the ranks' chunks, one doc < a block


def doc_dense_attn(q, k, v, *, head_start, doc_ids):
    from ltrain.kernels import BlockLayout

    layout = BlockLayout.causal(q.shape[2] // BS, q.shape[2] // BS)
    return block_sparse_attention(q, k, v, layout, block_size=BS, q_doc=doc_ids, k_doc=doc_ids)


def doc_s2_attn(q, k, v, *, head_start, doc_ids):
    layout = s2_layout(HQ, q.shape[2], **S2).heads(head_start, q.shape[1])
    return block_sparse_attention(q, k, v, layout, block_size=BS, q_doc=doc_ids, k_doc=doc_ids)


DOC_ATTN = {"dense": doc_dense_attn, "s2": doc_s2_attn}


def _ulysses_documents_vs_single_process(rank, world_size):
    """attn_fn gets the whole row's doc ids from this rank's shard; errors against one process."""
    g = torch.Generator().manual_seed(11)
    q, do = (torch.randn(B, HQ, N, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, HKV, N, D, generator=g) for _ in range(2))
    doc = packed_docs(DOC_LENGTHS, B)
    results = {}
    for kind, attn_fn in DOC_ATTN.items():
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        o_ref = attn_fn(*full, head_start=0, doc_ids=doc)
        o_ref.backward(do)
        for mode in ("zigzag", "contiguous"):
            local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
            o = ulysses_attention(*local, attn_fn=attn_fn, group=None, mode=mode,
                                  doc_ids=shard_sequence(doc, rank, world_size, mode=mode))
            o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
            gather = [gather_sequence(t, None, mode=mode, dim=2) for t in (o, *(x.grad for x in local))]
            results[kind, mode] = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), gather,
                                                                      (o_ref, *(x.grad for x in full)))}
    return results


def _check_documents(world_size):
    for results in run_ranks(_ulysses_documents_vs_single_process, world_size, timeout=150):
        for key, errors in results.items():
            assert max(errors.values()) < 1e-5, (key, errors)


def test_ulysses_documents_two_ranks():
    _check_documents(2)


@pytest.mark.slow
def test_ulysses_documents_four_ranks():
    _check_documents(4)


# ---- half precision (docs/algorithms.md#half-precision-test-criterion) ------------------------
# Ulysses only permutes elements (two all-to-alls each way), so its half-precision error is the
# attention's: the CPU block-sparse kernel on the causal layout, as the model's dense kind runs it.
# Yardstick: torch SDPA with the explicit causal mask in the half dtype, one process; reference:
# fp32 on the same rounded values. Tiny heads (4 query heads for cp = 4, KV heads replicated there).
HALF_HQ, HALF_HKV, HALF_D, HALF_BS = 4, 2, 16, 64


def half_inputs(n, dtype, seed=19):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(1, HALF_HQ, n, HALF_D, generator=g) for _ in range(2))
    k, v = (torch.randn(1, HALF_HKV, n, HALF_D, generator=g) for _ in range(2))
    return [t.to(dtype) for t in (q, k, v, do)]


def kernel_causal_attn(q, k, v, *, head_start):
    from ltrain.kernels import BlockLayout

    m = q.shape[2] // HALF_BS
    return block_sparse_attention(q, k, v, BlockLayout.causal(m, m), block_size=HALF_BS)


def _ulysses_half(rank, world_size, n, cases):
    """Rank 0: {(dtype, mode): gathered {out, dq, dk, dv} as fp32}."""
    from tests.parallel.test_ring import HALF_NAMES

    results = {}
    for dtype, mode in cases:
        q, k, v, do = half_inputs(n, dtype)
        local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
        o = ulysses_attention(*local, attn_fn=kernel_causal_attn, group=None, mode=mode)
        assert o.dtype == dtype
        o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
        got = [gather_sequence(t, None, mode=mode, dim=2).float() for t in (o, *(x.grad for x in local))]
        results[dtype, mode] = dict(zip(HALF_NAMES, got))
    return results if rank == 0 else None


def check_ulysses_half(world_size, n, cases):
    from tests.parallel.test_ring import SDPA_YARDSTICK, causal_sdpa_yardsticks
    from tests.precision import check_collective

    return check_collective(_ulysses_half, world_size, n, cases,
                            lambda c: causal_sdpa_yardsticks(*half_inputs(n, c[0])), lambda c: SDPA_YARDSTICK)


def test_ulysses_bf16_two_ranks():
    check_ulysses_half(2, 512, [(torch.bfloat16, "zigzag"), (torch.bfloat16, "contiguous")])


@pytest.mark.slow  # 1-6 min per world size on two cores shared with other work (4K tokens)
@pytest.mark.parametrize("world_size", [2, 4])
def test_ulysses_half_precision_4k(world_size):
    check_ulysses_half(world_size, 4096, [(dtype, mode) for dtype in (torch.bfloat16, torch.float16)
                                          for mode in ("zigzag", "contiguous")])
