"""Ring attention on real gloo ranks vs attention over the full sequence in one process."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ltrain.kernels import BlockLayout, block_sparse_attention, block_sparse_cpu, s2_layout
from ltrain.parallel import CommMeter, gather_sequence, ring_attention, shard_sequence
from ltrain.parallel import ring
from ltrain.parallel.ring import cached_plan, ring_plan
from tests.multiproc import run_ranks

B, HQ, HKV, D, N, BS = 2, 4, 2, 32, 256, 16


def dense_layout(m):
    return BlockLayout.causal(m, m)


def s2_ring_layout(m):
    return s2_layout(HQ, m * BS, block_size=BS, local_blocks=2, vert_stride=4)


LAYOUTS = {"dense": dense_layout, "s2": s2_ring_layout}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(kind, q, k, v):
    """The oracle: SDPA for dense, the block-sparse kernel on the whole sequence for S2."""
    if kind == "dense":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return block_sparse_attention(q, k, v, s2_ring_layout(N // BS), block_size=BS)


class KernelForwards:
    """Counts calls of the CPU kernel's forward while entered (an instrument: the kernel still runs)."""

    def __enter__(self):
        self.calls, self._forward = 0, block_sparse_cpu.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return self._forward(*args, **kwargs)

        block_sparse_cpu.forward = counted
        return self

    def __exit__(self, *exc):
        block_sparse_cpu.forward = self._forward


def _ring_vs_single_process(rank, world_size):
    g = torch.Generator().manual_seed(5)
    q, do = (torch.randn(B, HQ, N, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, HKV, N, D, generator=g) for _ in range(2))
    results = {}
    for kind in LAYOUTS:
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        reference(kind, *full).backward(do)
        for mode in ("zigzag", "contiguous"):
            local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
            with CommMeter() as fwd, KernelForwards() as fwd_tiles:
                o = ring_attention(*local, layout_fn=LAYOUTS[kind], group=None, block_size=BS, mode=mode)
            with CommMeter() as bwd, KernelForwards() as bwd_tiles:
                o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
            # The backward differentiates each tile from the global lse and delta, re-running no forward.
            assert fwd_tiles.calls > 0 and bwd_tiles.calls == 0, (fwd_tiles.calls, bwd_tiles.calls)
            o_ref = reference(kind, q, k, v)
            gather = [gather_sequence(t, None, mode=mode, dim=2) for t in (o, *(x.grad for x in local))]
            errors = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), gather,
                                                         (o_ref, *(x.grad for x in full)))}
            results[kind, mode] = errors, fwd.snapshot(), bwd.snapshot()
    bad = []
    try:  # N = 2 x cp x BS / 2: one block per rank does not split into two zigzag chunks
        ring_attention(*(t[:, :, :BS] for t in local), layout_fn=dense_layout, group=None, block_size=BS)
    except ValueError as exc:
        bad.append(str(exc))
    # Rank 0 runs a ring nobody else joins: it must fail with a message, not
    # hang. The others stay alive until it has (through the store, not gloo
    # p2p), so rank 0 sees a silent peer rather than a closed socket.
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        ring.P2P_TIMEOUT = timedelta(seconds=2)
        try:
            ring_attention(*local, layout_fn=dense_layout, group=None, block_size=BS)
        except RuntimeError as exc:
            bad.append(str(exc))
        store.set("lonely_ring_done", "1")
    else:
        store.wait(["lonely_ring_done"], timedelta(seconds=60))
    return results, bad


def _check(world_size):
    kv_bytes = 2 * B * HKV * (N // world_size) * D * 4
    for rank, (results, bad) in enumerate(run_ranks(_ring_vs_single_process, world_size, timeout=150)):
        for (kind, mode), (errors, fwd, bwd) in results.items():
            assert max(errors.values()) < 1e-5, (kind, mode, errors)
            # Forward: one K/V block forward per step, P - 1 steps.
            assert fwd["send"] == fwd["recv"] == {"calls": world_size - 1, "bytes": (world_size - 1) * kv_bytes}
            # Backward: K/V again, plus the fp32 dK/dV accumulators' P hops home.
            assert bwd["send"] == bwd["recv"] == {"calls": 2 * world_size - 1,
                                                  "bytes": (2 * world_size - 1) * kv_bytes}
            assert all(m["calls"] == 0 for kind_, m in {**fwd, **bwd}.items() if kind_ not in ("send", "recv"))
        assert bad[0] == (f"ring_attention (zigzag, cp={world_size}): sequence length N = {BS * world_size} must "
                          f"be divisible by 2 x cp x block_size = {2 * world_size * BS}")
        assert bad[1:] == ([f"ring_attention: rank 0 of {world_size} timed out after 0:00:02 exchanging K/V with "
                            f"ranks {world_size - 1} and 1 (a rank left the ring or p2p hung; the rank's own log says why)"] if rank == 0 else [])


def test_ring_two_ranks():
    _check(2)


def test_ring_four_ranks():
    _check(4)


def _triton_ring_vs_single_process(rank, world_size):
    """The ring with the Triton kernels (interpreted on CPU: TRITON_INTERPRET=1 set before the ranks start)."""
    n, hq, hkv, d = 128, 2, 1, 32  # the interpreter is slow; 32 is the smallest Triton head dim
    g = torch.Generator().manual_seed(6)
    q, do = (torch.randn(B, hq, n, d, generator=g) for _ in range(2))
    k, v = (torch.randn(B, hkv, n, d, generator=g) for _ in range(2))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True).backward(do)
    local = [shard_sequence(t, rank, world_size, dim=2).requires_grad_() for t in (q, k, v)]
    o = ring_attention(*local, layout_fn=dense_layout, group=None, block_size=BS, impl="triton")
    o.backward(shard_sequence(do, rank, world_size, dim=2))
    return [rel_err(gather_sequence(a.grad, None, dim=2), b.grad) for a, b in zip(local, full)]


@pytest.mark.slow  # about 50 s: the Triton interpreter
def test_ring_triton_backward_two_ranks(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for errors in run_ranks(_triton_ring_vs_single_process, 2, timeout=300):
        assert max(errors) < 1e-5, errors


def active_pairs(layout, cp, mode):
    """Active causal (q block, k block) pairs per rank, from the tiles the ring computes."""
    return [sum(int(t.layout.counts.sum()) for tiles in ring_plan(layout, r, cp, mode, BS) for t in tiles)
            for r in range(cp)]


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_balances_causal_work(cp):
    m = 64
    zigzag = active_pairs(dense_layout(m), cp, "zigzag")
    assert sum(zigzag) == m * (m + 1) // 2
    assert max(zigzag) <= 1.1 * min(zigzag), zigzag
    contiguous = active_pairs(dense_layout(m), cp, "contiguous")
    assert max(contiguous) > 2 * min(contiguous), contiguous


def test_plan_is_kept_with_the_layout_per_rank_cp_and_mode():
    layout, cpu = dense_layout(16), torch.device("cpu")
    plan = cached_plan(layout, cpu, 1, 2, "zigzag", BS)
    assert cached_plan(layout, cpu, 1, 2, "zigzag", BS) is plan
    assert cached_plan(dense_layout(16), cpu, 1, 2, "zigzag", BS) is not plan  # another layout: planned anew
    for other in [(0, 2, "zigzag"), (1, 2, "contiguous"), (1, 4, "zigzag")]:
        assert cached_plan(layout, cpu, *other, BS) is not plan
    fresh = ring_plan(layout, 1, 2, "zigzag", BS)
    assert [[(t.q, t.k, t.q_start, t.k_start) for t in tiles] for tiles in plan] == \
        [[(t.q, t.k, t.q_start, t.k_start) for t in tiles] for tiles in fresh]
    assert all(torch.equal(a.layout.indices, b.layout.indices) for x, y in zip(plan, fresh) for a, b in zip(x, y))


def test_s2_skips_tiles_its_heads_never_visit():
    m, cp = 64, 4
    with pytest.warns(UserWarning, match="context is dropped"):  # on purpose: a sparse layout
        layout = s2_layout(1, m * BS, block_size=BS, local_blocks=2, vert_stride=64, homo_head=True,
                           head_sliding_offset=0)  # local band + key block 0: most distant tiles are empty
    for r in range(cp):
        plan = ring_plan(layout, r, cp, "zigzag", BS)
        dense = ring_plan(dense_layout(m), r, cp, "zigzag", BS)
        assert sum(map(len, plan)) < sum(map(len, dense))
        assert all(not t.layout.is_empty() for tiles in plan for t in tiles)


# Packed documents: row 0 has a 1-token document and boundaries inside chunks and blocks, row 1
# documents on chunk boundaries, so many tiles' chunks share no document.
DOC_LENGTHS = ([5, 40, 1, 30, 52], [32, 32, 16, 16, 32])
N_DOCS = 128


def packed_doc_ids():
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in DOC_LENGTHS])


def _ring_docs_vs_single_process(rank, world_size):
    from ltrain.kernels.block_sparse_ref import block_sparse_reference
    g = torch.Generator().manual_seed(7)
    q, do = (torch.randn(B, HQ, N_DOCS, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, HKV, N_DOCS, D, generator=g) for _ in range(2))
    docs = packed_doc_ids()
    results = {}
    for kind, layout_fn in LAYOUTS.items():
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        block_sparse_reference(*full, layout_fn(N_DOCS // BS), q_doc=docs, k_doc=docs)[0].backward(do)
        for mode in ("zigzag", "contiguous"):
            local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
            with CommMeter() as fwd:
                o = ring_attention(*local, layout_fn=layout_fn, group=None, block_size=BS, mode=mode,
                                   doc_ids=shard_sequence(docs, rank, world_size, mode=mode, dim=1))
            with CommMeter() as bwd:
                o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
            gathered = [gather_sequence(t, None, mode=mode, dim=2) for t in (o, *(x.grad for x in local))]
            want = (block_sparse_reference(q, k, v, layout_fn(N_DOCS // BS), q_doc=docs, k_doc=docs)[0],
                    *(x.grad for x in full))
            errors = {n: (a - b).abs().max().item() for n, a, b in zip(("o", "dq", "dk", "dv"), gathered, want)}
            results[kind, mode] = errors, fwd.snapshot(), bwd.snapshot()
    return results


def _check_docs(world_size):
    for results in run_ranks(_ring_docs_vs_single_process, world_size, timeout=150):
        for (kind, mode), (errors, fwd, bwd) in results.items():
            assert max(errors.values()) < 1e-5, (kind, mode, errors)
            # One all-gather of the int32 doc ids per call, in the forward; the backward reuses them.
            assert fwd["all_gather"] == {"calls": 1, "bytes": world_size * B * (N_DOCS // world_size) * 4}, fwd
            assert bwd["all_gather"]["calls"] == 0, bwd


def test_ring_with_documents_two_ranks():
    _check_docs(2)


@pytest.mark.slow  # about a minute on two cores; the two-rank version runs by default
def test_ring_with_documents_four_ranks():
    _check_docs(4)


@pytest.mark.parametrize("cp,mode", [(2, "zigzag"), (4, "zigzag"), (4, "contiguous")])
def test_tiles_of_chunks_without_a_common_document_attend_no_block(cp, mode):
    """The ring leaves such a tile to the kernel (deciding it would read the ids on the host), whose
    block skip drops every block pair of it (doc_split: the CPU path's plan; the Triton kernels make
    the same range test per key tile): nothing of its K/V is read."""
    docs, m = packed_doc_ids(), N_DOCS // BS
    skipped = 0
    for r in range(cp):
        for tiles in ring_plan(dense_layout(m), r, cp, mode, BS):
            for t in tiles:
                q_doc, k_doc = (docs[:, s:s + N_DOCS // (2 * cp if mode == "zigzag" else cp)]
                                for s in (t.q_start, t.k_start))
                kept = [lay.block_mask().sum(dim=(1, 2, 3)) for lay in block_sparse_cpu.doc_split(
                    t.layout, q_doc, k_doc, block_size=BS, causal=True, q_start=t.q_start, k_start=t.k_start)]
                share = (k_doc[:, :, None] == q_doc[:, None, :]).flatten(1).any(1)  # [B]
                assert ((kept[0] + kept[1] == 0) | share).all()
                assert ((kept[0] + kept[1] > 0) | ~share).all()
                skipped += int((~share).sum())
    assert skipped > 0


def _triton_ring_docs_vs_single_process(rank, world_size):
    """The ring with doc ids and the Triton kernels (interpreted), against the oracle on one process."""
    from ltrain.kernels.block_sparse_ref import block_sparse_reference
    hq, hkv, d = 2, 1, 32
    g = torch.Generator().manual_seed(8)
    q, do = (torch.randn(B, hq, N_DOCS, d, generator=g) for _ in range(2))
    k, v = (torch.randn(B, hkv, N_DOCS, d, generator=g) for _ in range(2))
    docs, m = packed_doc_ids(), N_DOCS // BS
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want = block_sparse_reference(*full, dense_layout(m), q_doc=docs, k_doc=docs)[0]
    want.backward(do)
    local = [shard_sequence(t, rank, world_size, dim=2).requires_grad_() for t in (q, k, v)]
    o = ring_attention(*local, layout_fn=dense_layout, group=None, block_size=BS, impl="triton",
                       doc_ids=shard_sequence(docs, rank, world_size, dim=1))
    o.backward(shard_sequence(do, rank, world_size, dim=2))
    return [(gather_sequence(a, None, dim=2) - b).abs().max().item()
            for a, b in zip((o, *(x.grad for x in local)), (want, *(x.grad for x in full)))]


@pytest.mark.slow  # the Triton interpreter
def test_ring_triton_with_documents_two_ranks(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for errors in run_ranks(_triton_ring_docs_vs_single_process, 2, timeout=300):
        assert max(errors) < 1e-5, errors


# ---- half precision (docs/algorithms.md#half-precision-test-criterion) ------------------------
# bf16 / fp16 inputs through the ring on real gloo ranks, against the fp32 one-process reference
# on the same (rounded) inputs; the yardstick is the plain implementation: torch SDPA with the
# explicit causal mask, run in the half dtype on one process. Tiny heads (GQA 2:1, D = 16) keep a
# 4K-token ring affordable on two cores.
HALF_HQ, HALF_HKV, HALF_D = 2, 1, 16
HALF_NAMES = ("out", "dq", "dk", "dv")
SDPA_YARDSTICK = "torch SDPA with the explicit causal mask, in the half dtype, one process"


def half_inputs(n, dtype, seed=19):
    """q, k, v, do [1, H, n, D] drawn in fp32 and rounded to dtype (the bits every path sees)."""
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(1, HALF_HQ, n, HALF_D, generator=g) for _ in range(2))
    k, v = (torch.randn(1, HALF_HKV, n, HALF_D, generator=g) for _ in range(2))
    return [t.to(dtype) for t in (q, k, v, do)]


def masked_sdpa_grads(q, k, v, do, mask):
    """{out, dq, dk, dv} of SDPA with an explicit bool mask ([n, n] or [H, n, n]), in q's dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(do)
    return dict(zip(HALF_NAMES, (out.detach(), *(t.grad for t in leaves))))


def causal_sdpa_yardsticks(q, k, v, do):
    """(plain, want): masked causal SDPA in the inputs' half dtype, and in fp32 on the same values."""
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    return masked_sdpa_grads(q, k, v, do, mask), masked_sdpa_grads(*(t.float() for t in (q, k, v, do)), mask)


def _ring_half(rank, world_size, n, cases):
    """The ring (the model's dense path: causal layout, dense_block_size of a chunk) on n tokens,
    per (dtype, mode) in cases; rank 0 returns {case: gathered {out, dq, dk, dv} as fp32}."""
    from ltrain.parallel.sharding import dense_block_size

    results = {}
    for dtype, mode in cases:
        q, k, v, do = half_inputs(n, dtype)
        bs = dense_block_size(n // (2 * world_size if mode == "zigzag" else world_size))
        local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
        o = ring_attention(*local, layout_fn=dense_layout, group=None, block_size=bs, mode=mode)
        assert o.dtype == dtype
        o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
        got = [gather_sequence(t, None, mode=mode, dim=2).float() for t in (o, *(x.grad for x in local))]
        results[dtype, mode] = dict(zip(HALF_NAMES, got))
    return results if rank == 0 else None


def check_ring_half(world_size, n, cases):
    """Every case meets the criterion; returns {case: {name: (ring error, SDPA error)}}."""
    from tests.precision import check_collective

    return check_collective(_ring_half, world_size, n, cases, lambda c: causal_sdpa_yardsticks(*half_inputs(n, c[0])),
                            lambda c: SDPA_YARDSTICK)


HALF_MODES = ("zigzag", "contiguous")


def test_ring_bf16_two_ranks():
    # 512 tokens in the default run (the spawn dominates its time); the 4K ring is the slow tests.
    check_ring_half(2, 512, [(torch.bfloat16, mode) for mode in HALF_MODES])


@pytest.mark.slow  # 1-6 min per world size on two cores shared with other work (4K tokens)
@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_half_precision_4k(world_size):
    check_ring_half(world_size, 4096, [(dtype, mode) for dtype in (torch.bfloat16, torch.float16)
                                       for mode in HALF_MODES])
