"""Communication meter: every metered wrapper records then really communicates."""

import pytest
import torch

from ltrain.parallel import comm
from tests.multiproc import run_ranks


def _all_wrappers(rank, world_size):
    P = world_size
    with comm.CommMeter() as outer:
        with comm.CommMeter() as inner:
            out = torch.empty(P * 3)
            comm.all_gather_into_tensor(out, torch.full((3,), float(rank)))
            assert out.tolist() == [float(r) for r in range(P) for _ in range(3)]
        mine = torch.empty(2)
        comm.reduce_scatter_tensor(mine, torch.arange(P * 2, dtype=torch.float32))
        assert mine.tolist() == [P * 2.0 * rank, P * (2.0 * rank + 1)]
        t = torch.ones(4, dtype=torch.float64)
        comm.all_reduce(t)
        assert t.tolist() == [float(P)] * 4
        a2a = torch.empty(P, dtype=torch.int64)
        comm.all_to_all_single(a2a, torch.full((P,), rank, dtype=torch.int64))
        assert a2a.tolist() == list(range(P))
        recv = torch.empty(5)
        for req in (comm.isend(torch.full((5,), float(rank)), (rank + 1) % P), comm.irecv(recv, (rank - 1) % P)):
            req.wait()
        assert recv.tolist() == [float((rank - 1) % P)] * 5
        if rank == 0:
            comm.isend(torch.zeros(2), 1).wait()
        elif rank == 1:
            comm.irecv(torch.zeros(2), 0).wait()
    snap = outer.snapshot()
    outer.reset()
    return snap, inner.snapshot(), outer.snapshot()


def test_meter_counts_every_kind_on_two_ranks():
    results = run_ranks(_all_wrappers, 2)
    for rank, (snap, inner, after_reset) in enumerate(results):
        assert snap["all_gather"] == {"calls": 1, "bytes": 2 * 3 * 4}
        assert snap["reduce_scatter"] == {"calls": 1, "bytes": 2 * 2 * 4}
        assert snap["all_reduce"] == {"calls": 1, "bytes": 4 * 8}
        assert snap["all_to_all"] == {"calls": 1, "bytes": 2 * 8}
        assert snap["send"] == {"calls": 2 - rank, "bytes": 20 + (8 if rank == 0 else 0)}
        assert snap["recv"] == {"calls": 1 + rank, "bytes": 20 + (8 if rank == 1 else 0)}
        assert inner["all_gather"]["calls"] == 1 and inner["reduce_scatter"]["calls"] == 0
        assert all(v == {"calls": 0, "bytes": 0} for v in after_reset.values())


def _shape_check(rank, world_size):
    x = torch.zeros(1, 2, 4 + rank, 8)
    try:
        comm.check_same_shape(None, q=torch.zeros(1, 2, 4, 8), k=x)
    except ValueError as exc:
        return str(exc)
    return None


def test_check_same_shape_raises_on_every_rank():
    messages = run_ranks(_shape_check, 2)
    assert all(m is not None and m.startswith("k must have the same shape") for m in messages)


def test_meter_records_only_while_entered():
    meter = comm.CommMeter()
    comm.record("all_gather", torch.zeros(10))
    assert meter.total_bytes() == 0
    with meter:
        comm.record("all_gather", torch.zeros(10))
    assert meter.snapshot()["all_gather"] == {"calls": 1, "bytes": 40}
