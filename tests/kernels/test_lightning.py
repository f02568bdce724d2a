"""Public op `lightning_attention`: autograd, dispatch, dtypes, input errors."""

import pytest
import torch

from ltrain.kernels import lightning_attention
from ltrain.kernels.lightning_ref import lightning_recurrent
from tests.kernels.test_lightning_ref import doc_ids_from_starts
from tests.precision import assert_half_precision


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


PLAIN_LIGHTNING = ("naive quadratic formula (Q K^T * D) V + (Q * lambda^(t+1)) S_0, D_ts = lambda^(t-s) (s <= t), "
                   "run in the half dtype (plain_lightning)")
# (decay, initial state) of the half-precision cases: no decay, decay, decay and S_0, S_0 alone.
HALF_CASES = [(False, False), (True, False), (True, True), (False, True)]


def plain_lightning(q, k, v, decay=None, s0=None):
    """The naive formula in q's dtype, the yardstick of the half-precision tests: every matmul
    and product in that dtype; the decay factors lambda^x are computed in fp32 and rounded once
    (rounding lambda itself first would shift every power). decay [H] or None, s0 [B, H, Dk, Dv]
    or None."""
    H, N = q.shape[1], q.shape[2]
    pos = torch.arange(N, device=q.device)
    lam = torch.ones(H, device=q.device) if decay is None else decay
    diff = pos.view(-1, 1) - pos.view(1, -1)
    mask = torch.where(diff >= 0, lam.view(-1, 1, 1) ** diff.clamp(min=0), 0.0).to(q.dtype)
    o = ((q @ k.transpose(-1, -2)) * mask) @ v
    if s0 is not None:
        o = o + (q * (lam.view(-1, 1, 1) ** (pos + 1).view(1, -1, 1)).to(q.dtype)) @ s0.to(q.dtype)
    return o


def lightning_half_precision(dtype, impl, with_decay, with_state, *, N=40, chunk_size=16, seed=0):
    """lightning_attention(impl) on q, k, v, S_0 in `dtype` against plain_lightning in `dtype`
    (the yardstick), both against the fp64 token recurrence on the fp32 inputs; o within 2x,
    dq, dk, dv, d_initial and the learned decay's gradient within 3x (tests/precision.py).
    N = 40 in chunks of 16: a short last chunk."""
    q, k, v, s0 = inputs(N=N, seed=seed)
    do = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(seed + 1))
    decay = torch.tensor([0.95, 0.8]) if with_decay else None
    names = ["dq", "dk", "dv"] + ["d_initial"] * with_state + ["d_decay"] * with_decay

    def grads(fn, cast, *, exact=False):
        xs = [cast(t).requires_grad_() for t in (q, k, v)]
        st = cast(s0).requires_grad_() if with_state else None
        lam = (decay.double() if exact else decay.clone()).requires_grad_() if with_decay else None
        o = fn(*xs, lam, st)
        leaves = xs + [st] * with_state + [lam] * with_decay
        return dict(out=o, **dict(zip(names, torch.autograd.grad(o, leaves, cast(do)))))

    want = grads(lambda q, k, v, lam, st: lightning_recurrent(q, k, v, lam, st)[0], lambda t: t.double(), exact=True)
    base = grads(plain_lightning, lambda t: t.to(dtype))
    got = grads(lambda q, k, v, lam, st: lightning_attention(q, k, v, decay=lam, initial_state=st,
                                                             chunk_size=chunk_size, impl=impl),
                lambda t: t.to(dtype))
    assert got["out"].dtype == dtype
    return assert_half_precision(got, base, want, yardstick=PLAIN_LIGHTNING)


@pytest.mark.parametrize("with_decay,with_state", HALF_CASES)
def test_half_precision_within_plain_error(with_decay, with_state):
    """The PyTorch path (impl="torch", fp32 chunk states and sums inside) in bf16: without and
    with a (learned) decay and an initial state; plain: plain_lightning in bf16; reference: the
    fp64 token recurrence."""
    lightning_half_precision(torch.bfloat16, "torch", with_decay, with_state)


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
        (dict(doc_ids=torch.zeros(1, 40)), "doc_ids"),
        (dict(doc_ids=torch.zeros(1, 39, dtype=torch.long)), "doc_ids"),
        (dict(doc_ids=torch.zeros(1, 40, dtype=torch.long, device="meta")), "doc_ids"),
        (dict(doc_ids=torch.tensor([[0] * 20 + [1] * 10 + [0] * 10])), "doc_ids must be non-decreasing"),
        (dict(initial_doc=torch.zeros(1, dtype=torch.long)), "initial_doc needs doc_ids"),
        (dict(doc_ids=torch.zeros(1, 40, dtype=torch.int32), initial_doc=torch.zeros(2, dtype=torch.long)),
         "initial_doc"),
        (dict(doc_ids=torch.zeros(1, 40, dtype=torch.int32), initial_doc=torch.zeros(1)), "initial_doc"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, arg):
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match=arg):
        lightning_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype,why", [(torch.float64, "compute in fp32"), (torch.float16, "float16's range")])
def test_unsupported_dtype_is_one_clear_value_error(dtype, why, impl):
    """fp64 (both paths compute in fp32) and fp16 (unnormalised sums overflow it at long N): one
    ValueError line naming q, k, v and the dtypes to cast to, before any kernel runs."""
    q, k, v, _ = (t.to(dtype) for t in inputs())
    with pytest.raises(ValueError, match=rf"^lightning attention: q, k, v have dtype {dtype}.*{why}.*"
                                         r"cast q, k, v to one of torch.float32, torch.bfloat16$") as err:
        lightning_attention(q, k, v, decay=torch.tensor([0.9, 0.8]), impl=impl)
    assert "\n" not in str(err.value)


def test_mixed_dtypes_raise_value_error():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match=r"dtype mismatch: q torch.bfloat16, k torch.float32, v torch.float32"):
        lightning_attention(q.bfloat16(), k, v)


def test_mismatched_shapes_raise_value_error():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match="k must"):
        lightning_attention(q, k[:, :, :-1], v)
    with pytest.raises(ValueError, match="v must"):
        lightning_attention(q, k, v[:, :1])


# Chunk 16 over N = 40: documents shorter than a chunk (1 and 3 tokens), starts inside chunks
# and on a chunk boundary (16, 32), a document crossing chunks (21..31 and 5..15).
PACKED = ((5, 16, 17, 21, 32), (3, 6, 7, 8, 30))


def segments(starts, N):
    bounds = [0, *starts, N]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_packed_row_equals_each_document_alone(impl):
    """Each document of a packed row gets the outputs and gradients (decay's too, summed over
    the documents) of running it alone in its own row; the final state is the last document's."""
    q, k, v, _ = inputs(B=2, N=40)
    do, d_final = torch.randn_like(v), torch.randn(2, 2, 16, 16)
    doc_ids = doc_ids_from_starts(40, *PACKED)
    packed = [t.clone().requires_grad_() for t in (q, k, v, torch.tensor([0.9, 0.6]))]
    o, final = lightning_attention(*packed[:3], decay=packed[3], doc_ids=doc_ids, return_final_state=True,
                                   chunk_size=16, impl=impl)
    torch.autograd.backward((o, final), (do, d_final))
    d_decay_alone = torch.zeros(2)
    for row, starts in enumerate(PACKED):
        for a, b in segments(starts, 40):
            alone = [t[row:row + 1, :, a:b].clone().requires_grad_() for t in (q, k, v)]
            decay = torch.tensor([0.9, 0.6], requires_grad=True)
            # Alone on the reference: Triton and the reference agree without documents (test_lightning_triton).
            o_doc, f_doc = lightning_attention(*alone, decay=decay, return_final_state=True, chunk_size=16,
                                               impl="torch")
            last = b == 40
            torch.autograd.backward((o_doc, f_doc), (do[row:row + 1, :, a:b], d_final[row:row + 1] * last))
            d_decay_alone += decay.grad
            torch.testing.assert_close(o[row:row + 1, :, a:b], o_doc, rtol=1e-5, atol=1e-5)
            for x, y in zip(packed, alone):
                torch.testing.assert_close(x.grad[row:row + 1, :, a:b], y.grad, rtol=1e-5, atol=1e-5)
            if last:
                torch.testing.assert_close(final[row:row + 1], f_doc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[3].grad, d_decay_alone, rtol=1e-5, atol=1e-5)


def test_documents_are_causal():
    """Changing token t (q, k and v) never changes an output before t, across documents."""
    q, k, v, _ = inputs(N=40)
    doc_ids = doc_ids_from_starts(40, PACKED[0])
    o = lightning_attention(q, k, v, decay=torch.tensor([0.9, 0.6]), doc_ids=doc_ids, chunk_size=16)
    for t in (3, 16, 20, 33):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t] += 1.0
        o2 = lightning_attention(q2, k2, v2, decay=torch.tensor([0.9, 0.6]), doc_ids=doc_ids, chunk_size=16)
        torch.testing.assert_close(o2[:, :, :t], o[:, :, :t], rtol=0, atol=0)
        assert (o2[:, :, t] != o[:, :, t]).any()


def test_one_document_equals_no_documents():
    q, k, v, s0 = inputs(N=40)
    a = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    b = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    decay = torch.tensor([0.9, 0.6])
    o_a = lightning_attention(*a[:3], decay=decay, initial_state=a[3], chunk_size=16)
    o_b = lightning_attention(*b[:3], decay=decay, initial_state=b[3], chunk_size=16,
                              doc_ids=torch.full((1, 40), 4, dtype=torch.int32))
    o_a.square().sum().backward()
    o_b.square().sum().backward()
    torch.testing.assert_close(o_b, o_a, rtol=1e-6, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad, x.grad, rtol=1e-6, atol=1e-6)
