"""Public op `lightning_attention`: autograd, dispatch, dtypes, input errors."""

import pytest
import torch

from ltrain.kernels import lightning_attention
from ltrain.kernels.lightning_ref import lightning_recurrent
from tests.kernels.test_lightning_ref import doc_ids_from_starts


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
