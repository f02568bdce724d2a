"""Public op `lightning_attention`: autograd, dispatch, dtypes, input errors."""

import pytest
import torch

from ltrain.kernels import lightning_attention
from ltrain.kernels.lightning_ref import lightning_recurrent


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(B=1, H=2, N=40, Dk=16, Dv=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, N, Dk, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, N, Dv, generator=g).to(dtype)
    s0 = torch.randn(B, H, Dk, Dv, generator=g)
    return q, k, v, s0


@pytest.mark.parametrize("with_decay", [False, True])
def test_autograd_matches_recurrence(with_decay):
    q, k, v, s0 = inputs()
    decay = torch.tensor([0.95, 0.7]) if with_decay else None
    a = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    b = [t.clone().double().requires_grad_() for t in (q, k, v, s0)]
    if with_decay:  # a learned decay: its gradient reaches the leaf through log()
        a.append(decay.clone().requires_grad_())
        b.append(decay.double().requires_grad_())
    o, final = lightning_attention(*a[:3], decay=a[4] if with_decay else None, initial_state=a[3],
                                   return_final_state=True, chunk_size=16)
    (o.square().sum() + final.sin().sum()).backward()
    o_ref, f_ref = lightning_recurrent(*b[:3], b[4] if with_decay else None, b[3])
    (o_ref.square().sum() + f_ref.sin().sum()).backward()
    assert rel_err(o, o_ref) < 1e-5 and rel_err(final, f_ref) < 1e-5
    for x, y in zip(a, b):
        assert x.grad.dtype == x.dtype
        assert rel_err(x.grad, y.grad) < 1e-5


def test_output_only_and_final_state_only_grads():
    q, k, v, _ = inputs()
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    lightning_attention(*a).sum().backward()
    assert all(t.grad is not None for t in a)
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    _, final = lightning_attention(*b, return_final_state=True)
    final.sum().backward()
    assert b[0].grad.abs().max() == 0 and b[1].grad.abs().max() > 0


def test_fixed_decay_gets_no_gradient_pass():
    """decay without requires_grad: no decay gradient, and the graph does not ask for one."""
    q, k, v, _ = inputs()
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    decay = torch.tensor([0.95, 0.7])
    lightning_attention(*a, decay=decay).sum().backward()
    assert decay.grad is None and all(t.grad is not None for t in a)


def test_bfloat16_close_to_fp32():
    q, k, v, _ = inputs(dtype=torch.bfloat16)
    decay = torch.tensor([0.99, 0.9])
    o = lightning_attention(q, k, v, decay=decay)
    o_ref, _ = lightning_recurrent(q.double(), k.double(), v.double(), decay)
    assert o.dtype == torch.bfloat16
    # The reference accumulates in fp32: only input and output rounding remain.
    assert rel_err(o, o_ref) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync exists only on a GPU")
def test_no_host_sync_on_cuda():
    """Forward and backward with a learned decay make no synchronising call (the decay's values
    are not read on CUDA)."""
    q, k, v, s0 = (t.cuda() for t in inputs(Dk=64, Dv=64))
    leaves = [t.requires_grad_() for t in (q, k, v, s0, torch.tensor([0.95, 0.7], device="cuda"))]

    def step():
        o = lightning_attention(*leaves[:3], decay=leaves[4], initial_state=leaves[3])
        return torch.autograd.grad(o.square().sum(), leaves)

    step()  # compiles the kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(decay=torch.tensor([0.5, 1.5])), "decay"),
        (dict(decay=torch.tensor([0.0, 0.5])), "decay"),
        (dict(decay=torch.tensor([0.5])), "decay"),
        (dict(initial_state=torch.zeros(1, 2, 16, 8)), "initial_state"),
        (dict(chunk_size=48), "chunk_size"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, arg):
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match=arg):
        lightning_attention(q, k, v, **kwargs)


def test_mismatched_shapes_raise_value_error():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match="k must"):
        lightning_attention(q, k[:, :, :-1], v)
    with pytest.raises(ValueError, match="v must"):
        lightning_attention(q, k, v[:, :1])
