"""LASP-2H on real gloo ranks vs causal SDPA on the full sequence in one process."""

import pytest
import torch
import torch.nn.functional as F

from ltrain.parallel import CommMeter, lasp2h_attention
from tests.multiproc import run_ranks

B, D = 2, 8


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _lasp2h_vs_single_process(rank, world_size, C, Hq, Hkv):
    g = torch.Generator().manual_seed(3)
    N = world_size * C
    q, do = (torch.randn(B, Hq, N, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, Hkv, N, D, generator=g) for _ in range(2))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    o_full = F.scaled_dot_product_attention(*full, is_causal=True, scale=0.3, enable_gqa=Hq != Hkv)
    o_full.backward(do)

    mine = slice(rank * C, (rank + 1) * C)
    local = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    with CommMeter() as fwd_meter:
        o = lasp2h_attention(*local, group=None, sm_scale=0.3)
    with CommMeter() as bwd_meter:
        o.backward(do[:, :, mine])
    errors = {"o": rel_err(o, o_full[:, :, mine])}
    errors.update({f"d{n}": rel_err(a.grad, b.grad[:, :, mine]) for n, a, b in zip("qkv", local, full)})
    bad = []
    for kwargs in [dict(q_start=-1), dict(check_shards=True)]:
        try:
            lasp2h_attention(*(t[:, :, : C - rank] for t in local), group=None, **kwargs)
        except ValueError as exc:
            bad.append(str(exc))
    return errors, fwd_meter.snapshot(), bwd_meter.snapshot(), bad


def _check(world_size, C, Hq, Hkv):
    kv_elems = 2 * world_size * B * Hkv * C * D
    for errors, fwd, bwd, bad in run_ranks(_lasp2h_vs_single_process, world_size, C, Hq, Hkv):
        assert max(errors.values()) < 1e-5, errors
        assert fwd["all_gather"] == {"calls": 1, "bytes": kv_elems * 4}
        assert bwd["reduce_scatter"] == {"calls": 1, "bytes": kv_elems * 4}
        assert sum(m["calls"] for m in fwd.values()) == sum(m["calls"] for m in bwd.values()) == 1
        assert bad[0].startswith("q_start must lie in")
        assert bad[1].startswith("q must have the same shape on every rank")


def test_lasp2h_two_ranks_gqa():
    _check(2, 12, Hq=4, Hkv=2)


@pytest.mark.slow
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (6, 2)])
def test_lasp2h_four_ranks(Hq, Hkv):
    _check(4, 8, Hq, Hkv)


def test_lasp2h_local_shape_errors():
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        lasp2h_attention(q, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), group=None)
    with pytest.raises(ValueError, match="v must"):
        lasp2h_attention(q, torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 5, 8), group=None)
