"""The context-parallel dispatcher on real gloo ranks: each softmax kind's core on
this rank's zigzag shard (ring, Ulysses, LASP-2H, gathered per-step layout) vs the
same core on the whole sequence in one process: outputs, dq/dk/dv, the kind's stats,
and which collectives the path used."""

import logging

import pytest
import torch
import torch.distributed as dist

from ltrain.attention.context import AttnContext
from ltrain.attention.registry import build_attention
from ltrain.config import AttentionConfig, ModelConfig
from ltrain.parallel import CommMeter, gather_sequence, shard_sequence
from tests.multiproc import run_ranks

B, HQ, HKV, D, N = 1, 4, 2, 16, 256
INFLLM = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=4, init_blocks=1, window_size=32)
# (kind, regime, cp_impl, hybrid): every path the dispatcher can take.
CASES = [
    ("dense", "dense", "ring", False), ("dense", "dense", "ulysses", False), ("dense", "dense", "ring", True),
    ("s2", "sparse", "ring", False), ("s2", "sparse", "ulysses", False),
    ("infllm_v2", "sparse", "ring", False), ("infllm_v2", "sparse", "ulysses", False),
    ("infllm_v2", "dense", "ring", False), ("infllm_v2", "dense", "ulysses", False),
]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def core(kind: str, regime: str):
    attn = AttentionConfig(pattern="D")
    attn.s2.block_size, attn.s2.local_blocks, attn.s2.vert_stride = 16, 2, 2
    for key, value in {**INFLLM, "dense_len": 64 if regime == "sparse" else N}.items():
        setattr(attn.infllm_v2, key, value)
    model = ModelConfig(dim=HQ * D, n_heads=HQ, n_kv_heads=HKV)
    return build_attention(kind, 0, model, attn).core


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _dispatch_vs_single_process(rank, world_size):
    records = _Records()
    logging.getLogger("ltrain.attention").addHandler(records)
    logging.getLogger("ltrain.attention").setLevel(logging.INFO)
    g = torch.Generator().manual_seed(7)
    q, do = (torch.randn(B, HQ, N, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, HKV, N, D, generator=g) for _ in range(2))
    unused = torch.zeros(())  # the cores take no rotary tables: the projections applied them
    results = {}
    for case in CASES:
        kind, regime, cp_impl, hybrid = case
        fn = core(kind, regime)
        ref_ctx = AttnContext(cos=unused, sin=unused)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        o_ref = fn(*full, ref_ctx)
        o_ref.backward(do)
        ctx = AttnContext(cos=unused, sin=unused, cp_group=dist.group.WORLD, cp_impl=cp_impl, hybrid=hybrid)
        local = [shard_sequence(t, rank, world_size, dim=2).requires_grad_() for t in (q, k, v)]
        with CommMeter() as fwd:
            o = fn(*local, ctx)
        with CommMeter() as bwd:
            o.backward(shard_sequence(do, rank, world_size, dim=2))
        got = [gather_sequence(t, None, dim=2) for t in (o, *(x.grad for x in local))]
        errors = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), got, (o_ref, *(x.grad for x in full)))}
        results[case] = errors, ctx.stats, ref_ctx.stats, fwd.snapshot(), bwd.snapshot()
    return results, records.messages


def _check(world_size):
    kv_bytes = 2 * B * HKV * N * D * 4  # K and V of the whole sequence, fp32
    for results, messages in run_ranks(_dispatch_vs_single_process, world_size, timeout=300):
        for case, (errors, stats, stats_ref, fwd, bwd) in results.items():
            kind, regime, cp_impl, hybrid = case
            assert max(errors.values()) < 1e-5, (case, errors)
            assert stats["attn/layer0/mode"] == stats_ref["attn/layer0/mode"] == regime, case
            # A fraction is a float or a 0-dim tensor that the training loop reads at log steps.
            fraction, fraction_ref = float(stats["attn/layer0/block_fraction"]), float(stats_ref["attn/layer0/block_fraction"])
            assert fraction == pytest.approx(fraction_ref, abs=1e-12), case
            if regime == "sparse":
                assert fraction_ref < 0.7, case  # the layout really drops blocks
            used = {name for name, m in fwd.items() if m["calls"]}
            gathered = kind == "infllm_v2" and regime == "sparse" and (cp_impl == "ring" or HKV % world_size)
            if hybrid:  # LASP-2H: one all-gather of K/V, its reduce-scatter back
                assert used == {"all_gather"}, case
            elif gathered:  # one all-gather of K/V, one all-reduce for the stats; dK/dV reduce-scattered
                assert fwd["all_gather"] == {"calls": 1, "bytes": kv_bytes}, case
                assert used == {"all_gather", "all_reduce"} and fwd["all_reduce"]["calls"] == 1, case
                assert bwd["reduce_scatter"] == {"calls": 1, "bytes": kv_bytes}, case
                assert sum(m["calls"] for m in bwd.values()) == 1, case
            elif cp_impl == "ulysses":
                assert "all_to_all" in used and "send" not in used, case
            else:  # ring
                assert used == {"send", "recv"}, case
        assert any("all-gathers K/V" in m for m in messages), messages
        assert len(messages) == len(set(messages)), messages  # each reason logged once
        assert any("Ulysses needs whole KV groups" in m for m in messages) == bool(HKV % world_size), messages


def test_dispatcher_two_ranks():
    _check(2)


def test_dispatcher_four_ranks_ulysses_falls_back_for_per_step_layouts():
    _check(4)


# ---- packed documents ----------------------------------------------------

DOC_LENGTHS = [40, 5, 100, 111]  # boundaries inside blocks and across the ranks' chunks, one doc < a block


def _documents_vs_single_process(rank, world_size):
    """Every dispatcher path with ctx.doc_ids = this rank's shard, against the core on the
    whole sequence with the whole row's ids in one process."""
    g = torch.Generator().manual_seed(8)
    q, do = (torch.randn(B, HQ, N, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, HKV, N, D, generator=g) for _ in range(2))
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor(DOC_LENGTHS)).expand(B, N).to(torch.int32)
    unused = torch.zeros(())
    results = {}
    for case in CASES:
        fn = core(*case[:2])
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        o_ref = fn(*full, AttnContext(cos=unused, sin=unused, doc_ids=doc))
        o_ref.backward(do)
        ctx = AttnContext(cos=unused, sin=unused, cp_group=dist.group.WORLD, cp_impl=case[2], hybrid=case[3],
                          doc_ids=shard_sequence(doc, rank, world_size))
        local = [shard_sequence(t, rank, world_size, dim=2).requires_grad_() for t in (q, k, v)]
        o = fn(*local, ctx)
        o.backward(shard_sequence(do, rank, world_size, dim=2))
        got = [gather_sequence(t, None, dim=2) for t in (o, *(x.grad for x in local))]
        results[case] = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), got,
                                                            (o_ref, *(x.grad for x in full)))}
    return results


def _check_documents(world_size):
    for results in run_ranks(_documents_vs_single_process, world_size, timeout=300):
        for case, errors in results.items():
            assert max(errors.values()) < 1e-5, (case, errors)


def test_dispatcher_documents_two_ranks():
    _check_documents(2)


@pytest.mark.slow
def test_dispatcher_documents_four_ranks():
    _check_documents(4)
