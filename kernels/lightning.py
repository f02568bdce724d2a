"""Lightning attention: causal linear attention with per-head decay.

    S_t = lambda_h S_{t-1} + k_t v_t^T,   o_t = q_t^T S_t   (token t included)

No softmax and no normalisation: the model layer adds its output norm.
`lightning_attention` is the public op (validation, dispatch, one autograd
Function). `lightning_fwd` / `lightning_bwd` are the raw passes, exposed so
that parallel/lasp2 can wrap them in its own autograd Function.

Packed documents: with doc_ids [B, N] (non-decreasing per row) the state
resets at every document start, S_t = k_t v_t^T + [doc_t = doc_{t-1}]
lambda S_{t-1}; initial_state belongs to document initial_doc ([B]; None: it
continues the row's first document). doc_ids=None is the unmasked kernel.

The decay lambda is usually a fixed per-head constant (TransNormerLLM, like
ALiBi slopes). A decay that requires grad gets its gradient from the
backward (`decay_grad=True`), computed only then.
"""

from __future__ import annotations

import torch

from .doc_ids import check_doc_ids
from .impl import check_dtypes, use_triton
from .lightning_ref import lightning_ref_bwd, lightning_ref_fwd

# q, k, v dtypes both paths take. Not fp64: both compute in fp32 (lightning_ref upcasts, the
# Triton kernels load as fp32), so fp64 would silently get fp32 accuracy. Not fp16: o and the
# gradients are unnormalised sums over the sequence (no softmax bounds them; without decay,
# keys and values with a non-zero mean make |o_t| grow like t), which overflow fp16's 65504 at
# long N; bf16 has fp32's range.
DTYPES = (torch.float32, torch.bfloat16)
DTYPES_WHY = {None: "both paths compute in fp32",
              torch.float16: "outputs and gradients are unnormalised sums over the sequence that can exceed "
                             "float16's range (65504); bfloat16 has float32's"}

def check_lightning_inputs(q, k, v, decay=None, initial_state=None, chunk_size=64, doc_ids=None,
                           initial_doc=None) -> torch.Tensor | None:
    """Validate shapes, chunk size, documents and decay (values only off CUDA: no host sync);
    return log(decay) as fp32 [H] (or None).

    The log keeps decay's autograd graph: a gradient with respect to log(decay)
    reaches decay through it.

    q, k, v: one dtype of DTYPES (fp32, bf16); q, k: [B, H, N, Dk]; v: [B, H, N, Dv]; decay: [H] in (0, 1];
    initial_state: [B, H, Dk, Dv]; doc_ids: [B, N] integer, non-decreasing per
    row, on q's device; initial_doc: [B] integer on q's device, only with
    doc_ids. Raises ValueError naming the argument.
    """
    check_dtypes("lightning attention", DTYPES, DTYPES_WHY, q=q, k=k, v=v)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 (Triton block), got {chunk_size}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, Dk], got shape {tuple(q.shape)}")
    B, H, N, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} [B, H, N, Dk], got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, N, Dv] = [{B}, {H}, {N}, Dv], got {tuple(v.shape)}")
    if N == 0:
        raise ValueError("q has an empty sequence (N = 0)")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [B, H, Dk, Dv] = {[B, H, Dk, v.shape[-1]]}, got {tuple(initial_state.shape)}"
        )
    _check_docs(q, doc_ids, initial_doc)
    if decay is None:
        return None
    if decay.shape != (H,):
        raise ValueError(f"decay must be a per-head tensor of shape [{H}], got {tuple(decay.shape)}")
    # Reading a CUDA tensor's values would stall the host on every forward, so they are checked
    # where that is free (CPU tensors); on a GPU the model's decays lie in
    # (0, 1] by construction (ltrain.attention.linear: a fixed schedule, or exp(-exp(a))).
    if not decay.is_cuda and not bool(((decay > 0) & (decay <= 1)).all()):
        raise ValueError(f"decay values must lie in (0, 1], got {decay.tolist()}")
    return decay.float().log().to(q.device)


def _check_docs(q, doc_ids, initial_doc) -> None:
    """doc_ids [B, N] / initial_doc [B]: integer tensors on q's device; ValueError naming the
    argument. Monotonicity is checked off CUDA only (no host sync), like decay's values."""
    B, N = q.shape[0], q.shape[2]
    if doc_ids is None:
        if initial_doc is not None:
            raise ValueError("initial_doc needs doc_ids (the document of initial_state is compared with doc_ids[:, 0])")
        return
    check_doc_ids("doc_ids", doc_ids, (B, N), q.device)
    if initial_doc is not None:
        check_doc_ids("initial_doc", initial_doc, (B,), q.device, "[B]")
    if not doc_ids.is_cuda and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
        raise ValueError("doc_ids must be non-decreasing along each row (documents numbered in order)")


def lightning_fwd(q, k, v, log_decay, initial_state, chunk_size=64, impl="auto", doc_ids=None, initial_doc=None):
    """Forward pass, no autograd. Returns o [B, H, N, Dv] and final state [B, H, Dk, Dv] (fp32),
    the last document's state. doc_ids: [B, N] or None; initial_doc: [B] or None."""
    if use_triton(q, impl):
        from .lightning_triton import lightning_triton_fwd

        return lightning_triton_fwd(q, k, v, log_decay, initial_state, chunk_size, doc_ids, initial_doc)
    return lightning_ref_fwd(q, k, v, log_decay, initial_state, chunk_size, doc_ids, initial_doc)


def lightning_bwd(q, k, v, log_decay, initial_state, do, d_final, chunk_size=64, impl="auto", decay_grad=False,
                  doc_ids=None, initial_doc=None):
    """Backward pass: dq, dk, dv, the gradient of initial_state (fp32) and, with
    decay_grad, the gradient of log_decay ([H] fp32, summed over the batch), else None.

    do: [B, H, N, Dv]; d_final: gradient of the final state [B, H, Dk, Dv] or None;
    doc_ids, initial_doc: the forward's.
    """
    if use_triton(q, impl):
        from .lightning_triton import lightning_triton_bwd

        return lightning_triton_bwd(q, k, v, log_decay, initial_state, do, d_final, chunk_size, decay_grad,
                                    doc_ids, initial_doc)
    return lightning_ref_bwd(q, k, v, log_decay, initial_state, do, d_final, chunk_size, decay_grad, doc_ids,
                             initial_doc)


class _LightningAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, initial_state, log_decay, chunk_size, impl, doc_ids, initial_doc):
        o, final = lightning_fwd(q, k, v, log_decay, initial_state, chunk_size, impl, doc_ids, initial_doc)
        ctx.save_for_backward(q, k, v, initial_state, log_decay, doc_ids, initial_doc)
        ctx.chunk_size, ctx.impl = chunk_size, impl
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, initial_state, log_decay, doc_ids, initial_doc = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        dq, dk, dv, d_init, d_log_decay = lightning_bwd(q, k, v, log_decay, initial_state, do, d_final,
                                                        ctx.chunk_size, ctx.impl, ctx.needs_input_grad[4], doc_ids,
                                                        initial_doc)
        d_init = None if initial_state is None else d_init.to(initial_state.dtype)
        return dq, dk, dv, d_init, d_log_decay, None, None, None, None


def lightning_attention(q, k, v, *, decay=None, initial_state=None, return_final_state=False,
                        chunk_size=64, impl="auto", doc_ids=None, initial_doc=None):
    """Causal linear attention `o_t = q_t^T S_t`, `S_t = lambda_h S_{t-1} + k_t v_t^T`.

    q, k: [B, H, N, Dk]; v: [B, H, N, Dv], one dtype: fp32 or bf16 (DTYPES: fp16 and fp64 raise
    ValueError); decay: [H] with values in (0, 1]
    (None: no decay; differentiable; values checked unless decay is on CUDA);
    initial_state: [B, H, Dk, Dv] (S_0; differentiable). N need not be a
    multiple of chunk_size. doc_ids: [B, N] integer document ids,
    non-decreasing per row (None: one document): the state resets where the
    id changes; initial_doc: [B], the document initial_state belongs to
    (None: the row's first document continues it).
    Returns o: [B, H, N, Dv] in q's dtype, and with return_final_state also
    S_N: [B, H, Dk, Dv] in fp32 (the last document's). impl: "auto" (Triton on CUDA, PyTorch
    reference on CPU), "triton" or "torch".
    """
    log_decay = check_lightning_inputs(q, k, v, decay, initial_state, chunk_size, doc_ids, initial_doc)
    o, final = _LightningAttention.apply(q, k, v, initial_state, log_decay, chunk_size, impl, doc_ids, initial_doc)
    return (o, final) if return_final_state else o
