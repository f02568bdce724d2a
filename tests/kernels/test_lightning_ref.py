"""Chunked PyTorch reference vs the token-by-token recurrence (fp64 oracle)."""

import pytest
import torch

from ltrain.kernels.lightning_ref import lightning_recurrent, lightning_ref_bwd, lightning_ref_fwd


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make_inputs(B=2, H=3, N=45, Dk=8, Dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, N, Dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64)
    d_final = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
    return q, k, v, s0, do, d_final


DECAY = torch.tensor([1.0, 0.9, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("N,chunk", [(45, 16), (64, 16), (7, 16), (33, 32)])
def test_ref_matches_recurrence(with_decay, with_init, N, chunk):
    q, k, v, s0, do, d_final = make_inputs(N=N)
    decay = DECAY if with_decay else None
    init = s0 if with_init else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    o_ref, f_ref = lightning_recurrent(*leaves[:3], decay, leaves[3] if with_init else None)
    torch.autograd.backward((o_ref, f_ref), (do, d_final))

    args = [t.float() for t in (q, k, v)]
    log_decay = decay.float().log() if with_decay else None
    init32 = init.float() if with_init else None
    o, final = lightning_ref_fwd(*args, log_decay, init32, chunk)
    dq, dk, dv, d_init = lightning_ref_bwd(*args, log_decay, init32, do.float(), d_final.float(), chunk)

    assert o.dtype == torch.float32 and final.dtype == torch.float32
    for got, want in [(o, o_ref), (final, f_ref), (dq, leaves[0].grad), (dk, leaves[1].grad), (dv, leaves[2].grad)]:
        assert rel_err(got, want) < 1e-5
    if with_init:
        assert rel_err(d_init, leaves[3].grad) < 1e-5


def test_ref_no_final_grad_and_strong_decay_is_finite():
    """Tiny decay makes lambda^(-x) overflow if padded positions are not clamped."""
    q, k, v, _, do, _ = (t.float() for t in make_inputs(N=20))
    log_decay = torch.tensor([1e-3, 1e-3, 1e-3]).log()
    o, final = lightning_ref_fwd(q, k, v, log_decay, None, 16)
    grads = lightning_ref_bwd(q, k, v, log_decay, None, do, None, 16)
    o_ref, f_ref = lightning_recurrent(q, k, v, log_decay.exp())
    assert all(torch.isfinite(t).all() for t in (o, final, *grads))
    assert rel_err(o, o_ref) < 1e-5 and rel_err(final, f_ref) < 1e-5
