"""InfLLM-V2 under context parallelism on real gloo ranks vs infllm_v2_attention
on the full sequence in one process: outputs, dq/dk/dv and stats, sparse and
dense mode, zigzag and contiguous splits, gathered-K/V and Ulysses paths."""

import logging

import pytest
import torch

from ltrain.kernels import infllm_v2_attention
from ltrain.parallel import CommMeter, gather_sequence, infllm_v2_cp_attention, shard_sequence
from tests.multiproc import run_ranks

B, HQ, HKV, D, N = 1, 4, 2, 32, 512
PARAMS = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=4, init_blocks=1, window_size=32)
DENSE_LEN = {"sparse": 128, "dense": N}
# (mode, cp_impl) pairs the model can ask for; Ulysses on 4 ranks with 2 KV heads falls back to gathering.
CASES = [("zigzag", "ring"), ("contiguous", "ring"), ("zigzag", "ulysses")]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _cp_vs_single_process(rank, world_size):
    records = _Records()
    logging.getLogger("ltrain.parallel").addHandler(records)
    logging.getLogger("ltrain.parallel").setLevel(logging.INFO)
    g = torch.Generator().manual_seed(11)
    q, do = (torch.randn(B, HQ, N, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, HKV, N, D, generator=g) for _ in range(2))
    results = {}
    for regime, dense_len in DENSE_LEN.items():
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        o_ref, stats_ref = infllm_v2_attention(*full, dense_len=dense_len, **PARAMS)
        o_ref.backward(do)
        for mode, cp_impl in CASES:
            local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
            with CommMeter() as fwd:
                o, stats = infllm_v2_cp_attention(*local, group=None, mode=mode, cp_impl=cp_impl,
                                                  dense_len=dense_len, **PARAMS)
            with CommMeter() as bwd:
                o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
            got = [gather_sequence(t, None, mode=mode, dim=2) for t in (o, *(x.grad for x in local))]
            errors = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), got,
                                                         (o_ref, *(x.grad for x in full)))}
            results[regime, mode, cp_impl] = errors, stats, stats_ref, fwd.snapshot(), bwd.snapshot()
    bad = []
    for mode in ("zigzag", "spiral"):  # 16 tokens per rank: not 2 blocks per rank
        try:
            infllm_v2_cp_attention(*(t[:, :, :16] for t in (q, k, v)), group=None, mode=mode, dense_len=0,
                                   **PARAMS)
        except ValueError as exc:
            bad.append(str(exc))
    return results, records.messages, bad


def _check(world_size):
    n_elems = B * HKV * N * D  # of K (and of V) over the whole sequence
    for results, messages, bad in run_ranks(_cp_vs_single_process, world_size, timeout=240):
        for (regime, mode, cp_impl), (errors, stats, stats_ref, fwd, bwd) in results.items():
            case = (regime, mode, cp_impl, errors)
            assert max(errors.values()) < 1e-5, case
            assert stats["mode"] == stats_ref["mode"] == regime, case
            assert stats["block_fraction"] == pytest.approx(stats_ref["block_fraction"], abs=1e-12), case
            if regime == "sparse":
                assert stats_ref["block_fraction"] < 0.5, case  # the selection really drops blocks
            if regime == "sparse" and (cp_impl == "ring" or HKV % world_size):
                # Gathered path: one all-gather of K/V, one all-reduce for the stats; dK/dV reduce-scattered.
                assert fwd["all_gather"] == {"calls": 1, "bytes": 2 * n_elems * 4}, case
                assert fwd["all_reduce"]["calls"] == 1, case
                assert bwd["reduce_scatter"] == {"calls": 1, "bytes": 2 * n_elems * 4}, case
                assert sum(m["calls"] for m in bwd.values()) == 1, case
        assert any("all-gathers K/V" in m for m in messages), messages
        assert len(messages) == len(set(messages)), messages  # each reason logged once
        assert (any("Ulysses needs whole KV groups" in m for m in messages)) == bool(HKV % world_size), messages
        assert "must be divisible by 2 x cp x block_size" in bad[0], bad
        assert bad[1].startswith("mode='spiral'"), bad


def test_infllm_v2_cp_two_ranks():
    _check(2)


@pytest.mark.slow
def test_infllm_v2_cp_four_ranks_ulysses_falls_back():
    _check(4)
