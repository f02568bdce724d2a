"""LASP-2H on real gloo ranks vs causal SDPA on the full sequence in one process."""

import pytest
import torch
import torch.nn.functional as F

from ltrain.parallel import CommMeter, lasp2h_attention, shard_sequence
from tests.multiproc import run_ranks

B, D = 2, 8
MODES = ("contiguous", "zigzag")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _lasp2h_vs_single_process(rank, world_size, C, Hq, Hkv):
    """Per mode: errors of this rank's output and q/k/v grads (C tokens per rank),
    and the meter readings per pass; then the bad-input messages."""
    g = torch.Generator().manual_seed(3)
    N = world_size * C
    q, do = (torch.randn(B, Hq, N, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, Hkv, N, D, generator=g) for _ in range(2))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    o_full = F.scaled_dot_product_attention(*full, is_causal=True, scale=0.3, enable_gqa=Hq != Hkv)
    o_full.backward(do)

    results = {}
    for mode in MODES:
        def mine(t):
            return shard_sequence(t, rank, world_size, mode=mode, dim=2)

        local = [mine(t).clone().requires_grad_() for t in (q, k, v)]
        with CommMeter() as fwd_meter:
            o = lasp2h_attention(*local, group=None, sm_scale=0.3, mode=mode)
        with CommMeter() as bwd_meter:
            o.backward(mine(do))
        errors = {"o": rel_err(o, mine(o_full))}
        errors.update({f"d{n}": rel_err(a.grad, mine(b.grad)) for n, a, b in zip("qkv", local, full)})
        results[mode] = errors, fwd_meter.snapshot(), bwd_meter.snapshot()
    bad = []
    for kwargs in [dict(q_start=-1), dict(check_shards=True)]:
        try:
            lasp2h_attention(*(t[:, :, : C - rank] for t in local), group=None, **kwargs)
        except ValueError as exc:
            bad.append(str(exc))
    try:  # zigzag chunks of 12 tokens: not whole 16-token blocks
        lasp2h_attention(*(t[:, :, :24] for t in local), group=None, mode="zigzag")
    except ValueError as exc:
        bad.append(str(exc))
    return results, bad


def _check(world_size, C, Hq, Hkv):
    kv_elems = 2 * world_size * B * Hkv * C * D
    for results, bad in run_ranks(_lasp2h_vs_single_process, world_size, C, Hq, Hkv):
        for mode, (errors, fwd, bwd) in results.items():
            assert max(errors.values()) < 1e-5, (mode, errors)
            assert fwd["all_gather"] == {"calls": 1, "bytes": kv_elems * 4}
            assert bwd["reduce_scatter"] == {"calls": 1, "bytes": kv_elems * 4}
            assert sum(m["calls"] for m in fwd.values()) == sum(m["calls"] for m in bwd.values()) == 1
        assert bad[0].startswith("q_start must lie in")
        assert bad[1].startswith("q must have the same shape on every rank")
        assert bad[2].startswith(f"lasp2h_attention (zigzag, cp={world_size}): sequence length N = {24 * world_size} "
                                 f"must be divisible by 2 x cp x block_size = {32 * world_size}"), bad[2]


def test_lasp2h_two_ranks_gqa():
    # C = 96 tokens per rank: 3 query blocks of 32 (contiguous) or, zigzag, chunks of 48 = 3 blocks of 16.
    _check(2, 96, Hq=4, Hkv=2)


@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (6, 2)])
def test_lasp2h_four_ranks(Hq, Hkv):
    _check(4, 32, Hq, Hkv)


@pytest.mark.parametrize("q_start", [0, 48, 40])
def test_causal_layout_lists_exactly_the_blocks_a_chunk_sees(q_start):
    """Every key block holding a key visible to one of the chunk's queries, and no other."""
    from ltrain.parallel.lasp2h import causal_layout

    c, n_keys, bs = 32, 96, 16
    layout = causal_layout(q_start, c // bs, n_keys // bs, bs, torch.device("cpu"))
    visible = torch.arange(n_keys) <= torch.arange(q_start, q_start + c)[:, None]  # [c, n_keys]
    # A block is listed for a query block iff some query of that block sees a key of it.
    seen = visible.view(c // bs, bs, n_keys // bs, bs).any(3).any(1)
    assert torch.equal(layout.block_mask()[0, 0], seen)
    assert layout.max_active == int(seen.sum(1).max())


def test_lasp2h_local_shape_errors():
    q = torch.zeros(1, 3, 4, 8)
    # The check every sequence-parallel op shares (parallel.sharding.check_sharded_qkv).
    with pytest.raises(ValueError, match=r"with Hkv dividing Hq, got \(1, 3, 4, 8\), \(1, 2, 4, 8\)"):
        lasp2h_attention(q, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), group=None)
    with pytest.raises(ValueError, match=r"k, v \[B, Hkv, n, D\].*\(1, 3, 4, 8\), \(1, 3, 5, 8\)"):
        lasp2h_attention(q, torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 5, 8), group=None)


def test_lasp2h_mode_errors():
    # Raised before any collective: no process group needed.
    q = torch.zeros(1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"mode='stripe': allowed zigzag, contiguous"):
        lasp2h_attention(q, q, q, group=None, mode="stripe")
    with pytest.raises(ValueError, match=r"mode='zigzag' needs this rank's local length to be 2 equal chunks"):
        lasp2h_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], group=None, mode="zigzag")
    with pytest.raises(ValueError, match="q_start applies to mode='contiguous' only"):
        lasp2h_attention(q, q, q, group=None, q_start=0, mode="zigzag")


# lasp2h_sparse_attention: the per-step sparse layout over gathered K/V, with InfLLM-V2's
# per-token selection as the layout (each rank's chunks select over all keys at their global start).
SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=4, init_blocks=1, window_size=32)
SB, SHQ, SHKV, SD, SN = 1, 4, 2, 16, 256


def _select(q_c, k_all, q_start):
    from ltrain.kernels import infllm_v2_select

    return infllm_v2_select(q_c, k_all, q_start=q_start, **SPARSE)


def _sparse_vs_single_process(rank, world_size):
    from ltrain.kernels import block_sparse_attention
    from ltrain.parallel import gather_sequence, lasp2h_sparse_attention

    g = torch.Generator().manual_seed(5)
    q, do = (torch.randn(SB, SHQ, SN, SD, generator=g) for _ in range(2))
    k, v = (torch.randn(SB, SHKV, SN, SD, generator=g) for _ in range(2))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    layout = _select(full[0].detach(), full[1].detach(), 0)
    o_full = block_sparse_attention(*full, layout, block_size=SPARSE["block_size"])
    o_full.backward(do)
    results = {}
    for mode in MODES:
        local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
        with CommMeter() as fwd:
            o = lasp2h_sparse_attention(*local, select=_select, group=None, mode=mode,
                                        block_size=SPARSE["block_size"])
        with CommMeter() as bwd:
            o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
        got = [gather_sequence(t, None, mode=mode, dim=2) for t in (o, *(x.grad for x in local))]
        results[mode] = ({n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), got,
                                                             (o_full, *(x.grad for x in full)))},
                         fwd.snapshot(), bwd.snapshot())
    bad = []
    for mode in ("zigzag", "spiral"):  # 16 tokens per rank: not two whole blocks per zigzag chunk
        try:
            lasp2h_sparse_attention(*(t[:, :, :16] for t in (q, k, v)), select=_select, group=None, mode=mode,
                                    block_size=SPARSE["block_size"])
        except ValueError as exc:
            bad.append(str(exc))
    return results, layout.counts.sum().item() / layout.counts.numel(), bad


def test_lasp2h_sparse_two_ranks_equals_one_process():
    kv_bytes = 2 * SB * SHKV * SN * SD * 4
    for results, mean_blocks, bad in run_ranks(_sparse_vs_single_process, 2, timeout=240):
        assert mean_blocks < 0.5 * SN / SPARSE["block_size"]  # the selection really drops blocks
        for mode, (errors, fwd, bwd) in results.items():
            assert max(errors.values()) < 1e-5, (mode, errors)
            assert {k: m for k, m in fwd.items() if m["calls"]} == {"all_gather": {"calls": 1, "bytes": kv_bytes}}
            assert {k: m for k, m in bwd.items() if m["calls"]} == {"reduce_scatter": {"calls": 1, "bytes": kv_bytes}}
        assert "must be divisible by 2 x cp x block_size" in bad[0], bad
        assert bad[1].startswith("mode='spiral'"), bad


# ---- packed documents ----------------------------------------------------

DOC_LENGTHS = [40, 5, 100, 111]  # boundaries inside blocks and across the ranks' chunks, one doc < a block


def packed_docs(lengths, B):
    """int32 [B, sum(lengths)] document ids; row b's documents rotated by b (rows differ)."""
    rows = [torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths[b:] + lengths[:b]))
            for b in range(B)]
    return torch.stack(rows).to(torch.int32)


def _doc_select(q_c, k_all, q_start, q_doc, k_doc):
    from ltrain.kernels import infllm_v2_select

    return infllm_v2_select(q_c, k_all, q_start=q_start, q_doc=q_doc, k_doc=k_doc, **SPARSE)


def _documents_vs_single_process(rank, world_size):
    """lasp2h_attention (dense) and lasp2h_sparse_attention (InfLLM-V2 selection) with this
    rank's doc ids: errors of the gathered outputs and grads against one process."""
    from ltrain.kernels import block_sparse_attention
    from ltrain.parallel import gather_sequence, lasp2h_sparse_attention

    g = torch.Generator().manual_seed(9)
    N = sum(DOC_LENGTHS)
    q, do = (torch.randn(SB, SHQ, N, SD, generator=g) for _ in range(2))
    k, v = (torch.randn(SB, SHKV, N, SD, generator=g) for _ in range(2))
    doc = packed_docs(DOC_LENGTHS, SB)
    same_doc = (doc[:, :, None] == doc[:, None, :]) & torch.ones(N, N, dtype=torch.bool).tril()
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    dense_ref = F.scaled_dot_product_attention(*full, attn_mask=same_doc[:, None], enable_gqa=True)
    dense_grads = torch.autograd.grad(dense_ref, full, do)
    layout = _doc_select(full[0].detach(), full[1].detach(), 0, doc, doc)
    sparse_ref = block_sparse_attention(*full, layout, block_size=SPARSE["block_size"], q_doc=doc, k_doc=doc)
    sparse_grads = torch.autograd.grad(sparse_ref, full, do)
    results = {}
    for mode in MODES:
        local_doc = shard_sequence(doc, rank, world_size, mode=mode)
        for kind, ref, ref_grads in (("dense", dense_ref, dense_grads), ("sparse", sparse_ref, sparse_grads)):
            local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
            if kind == "dense":
                o = lasp2h_attention(*local, group=None, mode=mode, doc_ids=local_doc)
            else:
                o = lasp2h_sparse_attention(*local, select=_doc_select, group=None, mode=mode,
                                            block_size=SPARSE["block_size"], doc_ids=local_doc)
            o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
            got = [gather_sequence(t, None, mode=mode, dim=2) for t in (o, *(x.grad for x in local))]
            results[kind, mode] = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), got,
                                                                      (ref, *ref_grads))}
    return results


def _check_documents(world_size):
    for results in run_ranks(_documents_vs_single_process, world_size, timeout=240):
        for key, errors in results.items():
            assert max(errors.values()) < 1e-5, (key, errors)


def test_lasp2h_documents_two_ranks_equal_one_process():
    _check_documents(2)


@pytest.mark.slow
def test_lasp2h_documents_four_ranks_equal_one_process():
    _check_documents(4)


# ---- half precision (docs/algorithms.md#half-precision-test-criterion) ------------------------
# lasp2h_attention (dense) and lasp2h_sparse_attention (InfLLM-V2's CP path) in bf16 / fp16 on real
# gloo ranks against fp32 on one process, on the same rounded inputs. Yardstick: torch SDPA with the
# explicit mask (causal; for the sparse path causal AND the selected blocks), in the half dtype on
# one process. The selection is made from the fp32 values of the rounded inputs on every path, so
# all of them attend exactly the same keys (a near-tie flipping with the dtype would change which
# function is computed, not how precisely).
HALF_HQ, HALF_HKV, HALF_D = 2, 1, 16


def half_inputs(n, dtype, seed=19):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(1, HALF_HQ, n, HALF_D, generator=g) for _ in range(2))
    k, v = (torch.randn(1, HALF_HKV, n, HALF_D, generator=g) for _ in range(2))
    return [t.to(dtype) for t in (q, k, v, do)]


def _fp32_select(q_c, k_all, q_start):
    return _select(q_c.float(), k_all.float(), q_start)


def sparse_mask(q, k):
    """[Hq, n, n] bool: causal AND InfLLM-V2's selection over the whole sequence (fp32 values)."""
    n = q.shape[2]
    mask = _select(q.float(), k.float(), 0).to_mask(n, n).repeat_interleave(q.shape[1] // k.shape[1], dim=0)
    return mask & torch.ones(n, n, dtype=torch.bool).tril()


def _lasp2h_half(rank, world_size, n, cases):
    """cases: (kind "dense" | "sparse", dtype, mode). Rank 0: {case: gathered {out, dq, dk, dv} fp32}."""
    from ltrain.parallel import gather_sequence, lasp2h_sparse_attention
    from tests.parallel.test_ring import HALF_NAMES

    results = {}
    for kind, dtype, mode in cases:
        q, k, v, do = half_inputs(n, dtype)
        local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
        if kind == "dense":
            o = lasp2h_attention(*local, group=None, mode=mode)
        else:
            o = lasp2h_sparse_attention(*local, select=_fp32_select, group=None, mode=mode,
                                        block_size=SPARSE["block_size"])
        assert o.dtype == dtype
        o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
        got = [gather_sequence(t, None, mode=mode, dim=2).float() for t in (o, *(x.grad for x in local))]
        results[kind, dtype, mode] = dict(zip(HALF_NAMES, got))
    return results if rank == 0 else None


SPARSE_YARDSTICK = "torch SDPA with the explicit causal AND selected-block mask, in the half dtype, one process"


def check_lasp2h_half(world_size, n, cases):
    from tests.parallel.test_ring import SDPA_YARDSTICK, causal_sdpa_yardsticks, masked_sdpa_grads
    from tests.precision import check_collective

    def yardsticks(case):
        kind, dtype, _ = case
        q, k, v, do = half_inputs(n, dtype)
        if kind == "dense":
            return causal_sdpa_yardsticks(q, k, v, do)
        mask = sparse_mask(q, k)
        return masked_sdpa_grads(q, k, v, do, mask), masked_sdpa_grads(*(t.float() for t in (q, k, v, do)), mask)

    return check_collective(_lasp2h_half, world_size, n, cases, yardsticks,
                            lambda c: SDPA_YARDSTICK if c[0] == "dense" else SPARSE_YARDSTICK)


def test_lasp2h_bf16_two_ranks():
    check_lasp2h_half(2, 512, [(kind, torch.bfloat16, mode) for kind in ("dense", "sparse") for mode in MODES])


@pytest.mark.slow  # 1-6 min per world size on two cores shared with other work (4K tokens)
@pytest.mark.parametrize("world_size", [2, 4])
def test_lasp2h_half_precision_4k(world_size):
    check_lasp2h_half(world_size, 4096, [(kind, dtype, mode) for kind in ("dense", "sparse")
                                         for dtype in (torch.bfloat16, torch.float16) for mode in MODES])
