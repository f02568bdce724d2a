"""LASP-2 on real gloo ranks vs lightning_attention on the full sequence in one process."""

import pytest
import torch

from ltrain.kernels import lightning_attention
from ltrain.parallel import CommMeter, lasp2_linear_attention, shard_sequence
from tests.multiproc import run_ranks

MODES = ("contiguous", "zigzag")

B, H, DK, DV, CHUNK = 2, 3, 8, 4, 16


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _full_inputs(N, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, N, DK, generator=g) for _ in range(2))
    v, do = (torch.randn(B, H, N, DV, generator=g) for _ in range(2))
    return q, k, v, do


def _doc_ids(n, world_size):
    """[B, N] document ids (N = world_size * n tokens) whose starts hit every case of the split:
    row 0 starts a document inside a rank's chunk (5), on a zigzag chunk boundary (n/2), on a
    rank boundary (n, both modes), has a 1-token document (n) and a long last one spanning
    ranks; row 1 has a document crossing several ranks' chunks (n - 4 .. N - 8) and a 1-token
    document (N - 7). Ids start at 3 and skip values: only equality matters."""
    N = world_size * n
    starts = [torch.tensor(s) for s in ([5, n // 2, n, n + 1], [n - 4, N - 7, N - 6])]
    is_start = torch.zeros(2, N, dtype=torch.long)
    for row, s in enumerate(starts):
        is_start[row, s] = 1
    return 3 + 2 * is_start.cumsum(1)


def _lasp2_vs_single_process(rank, world_size, n):
    """Per mode, decay case and documents (none / packed): errors of this rank's output and
    q/k/v grads (n tokens per rank, split as the mode says), and the meter readings per pass."""
    report = {}
    base = torch.tensor([1.0, 0.97, 0.8])
    for mode, docs in [(mode, docs) for mode in MODES for docs in (None, _doc_ids(n, world_size))]:
        for name, decay in [("no_decay", None), ("decay", base), ("learned_decay", base.clone().requires_grad_())]:
            q, k, v, do = _full_inputs(world_size * n, seed=1)
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            decay_full = None if decay is None else decay.detach().clone().requires_grad_(decay.requires_grad)
            o_full = lightning_attention(*full, decay=decay_full, chunk_size=CHUNK, doc_ids=docs)
            o_full.backward(do)

            def mine(t, dim=2):
                return shard_sequence(t, rank, world_size, mode=mode, dim=dim)

            local = [mine(t).clone().requires_grad_() for t in (q, k, v)]
            local_docs = None if docs is None else mine(docs, dim=1).int()  # int32, as the loader gives
            with CommMeter() as fwd_meter:
                o = lasp2_linear_attention(*local, decay, chunk_size=CHUNK, mode=mode, doc_ids=local_docs)
            with CommMeter() as bwd_meter:
                o.backward(mine(do))
            case = report[mode, name if docs is None else f"docs_{name}"] = {
                "o": rel_err(o, mine(o_full)),
                **{f"d{n}": rel_err(a.grad, mine(b.grad)) for n, a, b in zip("qkv", local, full)},
                "fwd": fwd_meter.snapshot(),
                "bwd": bwd_meter.snapshot(),
            }
            if decay is not None and decay.requires_grad:
                case["d_decay_share"], case["d_decay_full"] = decay.grad, decay_full.grad
    return report


def _check_decay_grad(reports):
    """Each rank returns its share of d decay; the shares sum to the full-sequence gradient."""
    for mode, name in [(mode, name) for mode in MODES for name in ("learned_decay", "docs_learned_decay")]:
        shares = [r[mode, name]["d_decay_share"] for r in reports]
        full = reports[0][mode, name]["d_decay_full"]
        assert all(s.abs().min() > 0 for s in shares)  # every rank contributes to every head
        assert rel_err(sum(shares), full) < 2e-5, (mode, name)


def _check_report(report, world_size):
    for (mode, name), case in report.items():
        assert max(case[n] for n in ("o", "dq", "dk", "dv")) < 2e-5, case
        # zigzag: 2 chunk states per rank, still one collective each way; with documents the
        # forward's carries each chunk's last document id (B int32) beside its state
        m = 2 if mode == "zigzag" else 1
        state_bytes = world_size * m * B * H * DK * DV * 4
        doc_bytes = world_size * m * B * 4 if name.startswith("docs") else 0
        for meter, extra in [(case["fwd"], doc_bytes), (case["bwd"], 0)]:
            assert meter["all_gather"] == {"calls": 1, "bytes": state_bytes + extra}
            assert sum(m["calls"] for m in meter.values()) == 1


def _bad_inputs(rank, world_size):
    q, k, v, _ = _full_inputs(8 + 4 * rank, seed=0)
    errors = []
    for kwargs in [dict(decay=torch.tensor([0.5, 1.2, 0.9])), dict(check_shards=True)]:
        try:
            lasp2_linear_attention(q, k, v, **kwargs)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def _two_rank_suite(rank, world_size):
    # One spawn for both: starting gloo processes costs more than the checks.
    return _lasp2_vs_single_process(rank, world_size, 24), _bad_inputs(rank, world_size)


def test_lasp2_two_ranks_and_bad_inputs():
    # n = 24 (zigzag: chunks of 12) is not a multiple of the kernel chunk: rank and kernel chunking differ.
    results = run_ranks(_two_rank_suite, 2)
    for report, (decay_msg, shard_msg) in results:
        _check_report(report, 2)
        assert decay_msg.startswith("decay values must lie in (0, 1]")
        assert shard_msg.startswith("q must have the same shape on every rank")
    _check_decay_grad([report for report, _ in results])


def test_lasp2_four_ranks():
    reports = run_ranks(_lasp2_vs_single_process, 4, 16)
    for report in reports:
        _check_report(report, 4)
    _check_decay_grad(reports)


def test_lasp2_mode_errors():
    # Raised before any collective: no process group needed.
    q, k, v, _ = _full_inputs(12, seed=0)
    with pytest.raises(ValueError, match=r"mode='stripe': allowed zigzag, contiguous"):
        lasp2_linear_attention(q, k, v, mode="stripe")
    with pytest.raises(ValueError, match=r"mode='zigzag' needs this rank's local length to be 2 equal chunks"):
        lasp2_linear_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], mode="zigzag")


# ---- half precision (docs/algorithms.md#half-precision-test-criterion) ------------------------
# LASP-2 with a learned decay in bf16 on real gloo ranks, against lightning_attention in fp32 on one
# process (same rounded inputs, the same fp32 decay), with several kernel chunks per rank's chunk.
# Yardstick: the naive quadratic formula o = (Q K^T * D) V, D_ts = lambda^(t-s) (s <= t), run in
# bf16 on one process (tests/kernels/test_lightning.py's plain_lightning). The decay
# gradient is the sum of the ranks' shares. bf16 only: the Triton lightning kernel has no fp16.
HALF_H, HALF_D, HALF_CHUNK = 2, 16, 64
HALF_DECAY = (0.999, 0.99)  # 0.999: a state still carries ~2% after 4K tokens, so every rank's prefix matters
LASP2_NAMES = ("out", "dq", "dk", "dv", "ddecay")
QUADRATIC_YARDSTICK = "the naive quadratic (Q K^T * decay mask) V formula, in the half dtype, one process"


def half_inputs(n, dtype, seed=19):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, HALF_H, n, HALF_D, generator=g) for _ in range(4))
    return [t.to(dtype) for t in (q, k, v, do)]


def quadratic(q, k, v, decay):
    """The plain implementation, all in q's dtype (the decay mask cast to it)."""
    N = q.shape[2]
    pos = torch.arange(N)
    diff = (pos.view(-1, 1) - pos.view(1, -1)).clamp(min=0)
    mask = torch.where(pos.view(-1, 1) >= pos.view(1, -1), decay.view(-1, 1, 1) ** diff, 0.0)
    return ((q @ k.transpose(-1, -2)) * mask.to(q.dtype)) @ v


def _grads(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    decay = torch.tensor(HALF_DECAY, requires_grad=True)
    out = fn(*leaves, decay)
    out.backward(do)
    return dict(zip(LASP2_NAMES, (out.detach(), *(t.grad for t in leaves), decay.grad)))


def lasp2_yardsticks(q, k, v, do):
    """(plain, want): the quadratic formula in the half dtype; lightning_attention in fp32."""
    plain = _grads(quadratic, q, k, v, do)
    want = _grads(lambda q, k, v, decay: lightning_attention(q, k, v, decay=decay, chunk_size=HALF_CHUNK),
                  *(t.float() for t in (q, k, v, do)))
    return plain, want


def _lasp2_half(rank, world_size, n, cases):
    """Rank 0: {(dtype, mode): gathered {out, dq, dk, dv} and the summed decay shares, fp32}."""
    import torch.distributed as dist

    from ltrain.parallel import gather_sequence

    results = {}
    for dtype, mode in cases:
        q, k, v, do = half_inputs(n, dtype)
        local = [shard_sequence(t, rank, world_size, mode=mode, dim=2).requires_grad_() for t in (q, k, v)]
        decay = torch.tensor(HALF_DECAY, requires_grad=True)
        o = lasp2_linear_attention(*local, decay, chunk_size=HALF_CHUNK, mode=mode)
        assert o.dtype == dtype
        o.backward(shard_sequence(do, rank, world_size, mode=mode, dim=2))
        got = [gather_sequence(t, None, mode=mode, dim=2).float() for t in (o, *(x.grad for x in local))]
        dist.all_reduce(decay.grad)  # the data-parallel reduction's job in training
        results[dtype, mode] = dict(zip(LASP2_NAMES, (*got, decay.grad)))
    return results if rank == 0 else None


def check_lasp2_half(world_size, n, cases):
    from tests.precision import check_collective

    return check_collective(_lasp2_half, world_size, n, cases, lambda c: lasp2_yardsticks(*half_inputs(n, c[0])),
                            lambda c: QUADRATIC_YARDSTICK)


def test_lasp2_bf16_two_ranks():
    # 512 tokens: 4 kernel chunks per rank (contiguous), 2 per zigzag chunk; 4K in the slow tests.
    check_lasp2_half(2, 512, [(torch.bfloat16, mode) for mode in MODES])


@pytest.mark.slow  # 1-6 min per world size on two cores shared with other work (4K tokens)
@pytest.mark.parametrize("world_size", [2, 4])
def test_lasp2_bf16_4k(world_size):
    check_lasp2_half(world_size, 4096, [(torch.bfloat16, mode) for mode in MODES])
