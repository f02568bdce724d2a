"""The public op: argument validation, dispatch and the autograd Function."""

import pytest
import torch

from ltrain.kernels import BlockLayout, block_sparse_attention, block_sparse_attention_backward
from tests.kernels.test_block_sparse_cpu import NAMES, assert_close, make_qkv, run


def inputs(B=1, Hq=4, Hkv=2, N=64, D=32, dtype=torch.float32):
    q, k, v, *_ = make_qkv(B, Hq, Hkv, N, N, D, dtype=dtype)
    return q, k, v


def call(q, k, v, layout=None, **kw):
    layout = layout if layout is not None else BlockLayout.causal(q.shape[2] // 16, k.shape[2] // 16)
    return block_sparse_attention(q, k, v, layout, **{"block_size": 16, **kw})


@pytest.mark.parametrize("make_layout,match", [
    (lambda: BlockLayout.causal(3, 4), "query blocks"),
    (lambda: BlockLayout.causal(4, 3), "key blocks"),
    (lambda: BlockLayout.from_block_mask(torch.ones(1, 3, 4, 4, dtype=torch.bool)), "layout heads"),
    (lambda: BlockLayout.from_block_mask(torch.ones(3, 1, 4, 4, dtype=torch.bool)), "layout batch"),
])
def test_layout_shape_mismatch(make_layout, match):
    with pytest.raises(ValueError, match=match):
        call(*inputs(B=2), make_layout())


def test_layout_not_a_blocklayout():
    with pytest.raises(ValueError, match="layout must be a BlockLayout"):
        call(*inputs(), torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_sequence_not_divisible_by_block_size():
    q, k, v = inputs(N=72)
    with pytest.raises(ValueError, match="Nq=72 .*pad the sequence to a multiple of block_size"):
        call(q, k, v, BlockLayout.causal(4, 4))
    q, _, _ = inputs(N=64)
    _, k, v = inputs(N=72)
    with pytest.raises(ValueError, match="Nk=72 .*pad the sequence"):
        call(q, k, v, BlockLayout.causal(4, 4))


def test_block_size_unsupported():
    with pytest.raises(ValueError, match="block_size"):
        call(*inputs(), BlockLayout.causal(8, 8), block_size=8)


def test_gqa_heads_not_a_multiple():
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        call(*inputs(Hq=4, Hkv=3))


def test_dtype_mismatch_and_unsupported():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="dtype mismatch"):
        call(q.half(), k, v)
    with pytest.raises(ValueError, match="not supported"):
        call(q.double(), k.double(), v.double())


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fp64_is_one_clear_value_error(impl):
    """fp64 on either path (both compute in fp32; the Triton kernels have no fp64 tiles): one
    ValueError line naming q, k, v and the dtypes to cast to, no Triton trace."""
    q, k, v = (t.double() for t in inputs())
    with pytest.raises(ValueError, match=r"^block_sparse_attention: q, k, v have dtype torch.float64, which is not "
                                         r"supported \(.*fp32\): cast q, k, v to one of torch.float32, "
                                         r"torch.float16, torch.bfloat16$") as err:
        call(q, k, v, impl=impl)
    assert "\n" not in str(err.value)


def test_shape_mismatches():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="k and v"):
        call(q, k, v[..., :16])
    with pytest.raises(ValueError, match=r"q must be \[B, H, N, D\]"):
        call(q[0], k, v)
    with pytest.raises(ValueError, match="batch or head dim"):
        call(q[..., :16], k, v)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        call(*inputs(), impl="cuda")


def test_triton_rejects_unsupported_head_dim():
    with pytest.raises(ValueError, match="head dim 48 not supported by the Triton kernel"):
        call(*inputs(D=48), impl="triton")


def test_torch_path_serves_any_head_dim():
    q, k, v = inputs(D=48)
    assert call(q, k, v, impl="auto").shape == q.shape


def test_auto_on_cpu_is_the_reference():
    q, k, v, do, dlse = make_qkv(1, 4, 2, 64, 64, 32)
    fn = lambda impl: (lambda q, k, v: call(q, k, v, impl=impl, return_lse=True))
    assert_close(run(fn("auto"), q, k, v, do, dlse), run(fn("torch"), q, k, v, do, dlse), NAMES, rtol=0, atol=0)


def test_return_lse_flag_sm_scale_and_non_contiguous_inputs():
    q, k, v = inputs()
    out = call(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, sm_scale=0.5)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype
    out2, lse = call(q, k, v, sm_scale=0.5, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    out.sum().backward()   # out only: the Function gets no lse gradient
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_backward_from_global_statistics_is_the_split_attentions_gradient(impl):
    """Keys split in two halves: each half's backward, given the whole attention's lse and
    delta = do . o (not its own), sums to autograd's gradients of the whole attention."""
    q, k, v, do, _ = make_qkv(1, 4, 2, 64, 64, 32)
    out, lse = call(q, k, v, return_lse=True, impl=impl)
    want = torch.autograd.grad(out, (q, k, v), do)
    delta = (do * out.detach()).sum(-1)
    dq = torch.zeros_like(q)
    dkv = [torch.zeros_like(k), torch.zeros_like(v)]
    for start in (0, 32):
        layout = BlockLayout.from_block_mask(torch.ones(1, 1, 4, 2, dtype=torch.bool))  # causal via k_start
        dq_h, dk_h, dv_h = block_sparse_attention_backward(
            do, q.detach(), k.detach()[:, :, start:start + 32], v.detach()[:, :, start:start + 32], lse.detach(),
            delta, layout, block_size=16, k_start=start, impl=impl)
        dq += dq_h
        dkv[0][:, :, start:start + 32], dkv[1][:, :, start:start + 32] = dk_h, dv_h
    for got, ref in zip((dq, *dkv), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_backward_checks_its_inputs():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="block_size=24 has no kernel configuration"):
        block_sparse_attention_backward(q, q, k, v, q[..., 0], q[..., 0], BlockLayout.causal(4, 4), block_size=24)


@pytest.mark.parametrize("per_token", [False, True])
def test_autocast_does_not_change_the_result(per_token):
    """Under CPU bf16 autocast the op computes as without it (the reference's fp32 buffers once met an
    autocast bf16 matmul: index_copy_ Float vs BFloat16), forward and gradients, block and token layouts."""
    q, k, v, do, _ = make_qkv(1, 4, 2, 64, 64, 32, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(1, 2, 64 if per_token else 4, 4, generator=g) < 0.5
    layout = BlockLayout.from_block_mask(mask)

    def run_once(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = call(q, k, v, layout)
            return (out, *torch.autograd.grad(out, (q, k, v), do))

    for got, want in zip(run_once(True), run_once(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_doc_ids_both_or_neither():
    q, k, v = inputs()
    docs = torch.zeros(1, 64, dtype=torch.int64)
    with pytest.raises(ValueError, match="q_doc is given but k_doc is None"):
        call(q, k, v, q_doc=docs)
    with pytest.raises(ValueError, match="k_doc is given but q_doc is None"):
        block_sparse_attention_backward(q, q, k, v, q[..., 0], q[..., 0], BlockLayout.causal(4, 4), block_size=16,
                                        k_doc=docs)


@pytest.mark.parametrize("q_doc,k_doc,match", [
    (torch.zeros(1, 48, dtype=torch.int32), torch.zeros(1, 64, dtype=torch.int32),
     r"q_doc must be \[B, Nq\] = \[1, 64\]"),
    (torch.zeros(1, 64, dtype=torch.int32), torch.zeros(2, 64, dtype=torch.int32),
     r"k_doc must be \[B, Nk\] = \[1, 64\]"),
    (torch.zeros(1, 64), torch.zeros(1, 64), "q_doc must be an integer tensor"),
    (torch.zeros(1, 64, dtype=torch.int64), torch.zeros(1, 64, dtype=torch.bool), "k_doc must be an integer tensor"),
    (torch.zeros(64, dtype=torch.int64), torch.zeros(1, 64, dtype=torch.int64), r"q_doc must be \[B, Nq\]"),
])
def test_doc_ids_shape_and_dtype(q_doc, k_doc, match):
    with pytest.raises(ValueError, match=match):
        call(*inputs(), q_doc=q_doc, k_doc=k_doc)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_document_is_no_document(impl):
    """A row that is one document attends exactly as without doc ids (int64 ids accepted)."""
    q, k, v, do, dlse = make_qkv(1, 2, 1, 64, 64, 32)
    docs = torch.full((1, 64), 7)
    fn = lambda **kw: (lambda q, k, v: call(q, k, v, return_lse=True, impl=impl, **kw))
    assert_close(run(fn(q_doc=docs, k_doc=docs), q, k, v, do, dlse), run(fn(), q, k, v, do, dlse), NAMES)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_causal_with_documents(impl):
    """Changing q, k, v or the document ids at and after position 40 never changes an earlier output."""
    q, k, v = (t.detach() for t in inputs(B=1, Hq=2, Hkv=1))
    docs = torch.tensor([[0] * 5 + [1] * 30 + [2] * 29])
    out = call(q, k, v, impl=impl, q_doc=docs, k_doc=docs)
    later = [t.clone() for t in (q, k, v)]
    for t in later:
        t[:, :, 40:] = torch.randn(t[:, :, 40:].shape)
    new_docs = docs.clone()
    new_docs[:, 40:] = 5  # the third document ends at 39 now: a new one starts
    torch.testing.assert_close(call(*later, impl=impl, q_doc=new_docs, k_doc=new_docs)[:, :, :40], out[:, :, :40],
                               rtol=0, atol=0)
