"""block_sparse_attention: the public op, one autograd Function over two
implementations (Triton kernel, PyTorch reference) with the same forward and
backward contract, for both kinds of layout:

    block layout (rows = query blocks, Nq / block_size of them): S2, dense, ring tiles;
                 kernels block_sparse_triton / block_sparse_cpu.
    token layout (rows = query tokens, Nq of them, shared by a KV group's G
                 query heads): InfLLM-V2's per-token top-k, which keeps
                 selection causal; kernels token_sparse_triton / token_sparse_cpu.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from . import block_sparse_cpu, block_sparse_triton, token_sparse_cpu, token_sparse_triton
from .block_sparse_triton import BLOCK_SIZES, DTYPES
from .doc_ids import check_doc_pair
from .impl import check_dtypes, use_triton
from .layout import BlockLayout

_warned_head_dims: set[int] = set()

# Why DTYPES stops at fp32: both paths compute in fp32 (the CPU path upcasts, the Triton kernels
# keep fp32 accumulators and lse), so fp64 inputs would silently get fp32 accuracy, and the
# kernels have no fp64 tiles.
DTYPES_WHY = {None: "the CPU path and the Triton kernels compute in fp32"}


class BlockSparseAttention(torch.autograd.Function):
    """(q, k, v) -> (out, lse); the backward takes gradients of both, so a
    caller that merges partial results through lse (ring attention) gets exact
    gradients: d lse_i / d s_ij = p_ij folds into delta_i = do_i . o_i - dlse_i.

    Both passes run with autocast off: the implementations fix their own
    precision from the inputs' dtype (the reference computes in fp32 into fp32
    buffers, which an autocast bf16 matmul would break), so under autocast the
    op computes exactly as without it."""

    @staticmethod
    def forward(ctx, q, k, v, layout, impl, opts):
        with torch.autocast(q.device.type, enabled=False):
            out, lse = impl.forward(q, k, v, layout, **opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.impl, ctx.opts = layout, impl, opts
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        delta = (dout.float() * out.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = ctx.impl.backward(dout.contiguous(), q, k, v, lse, delta.contiguous(), ctx.layout,
                                           **ctx.opts)
        return dq, dk, dv, None, None, None


def _doc_opts(q_doc, k_doc) -> dict:
    """The implementations' doc-id arguments: int32, contiguous (the Triton kernels read them as int32)."""
    if q_doc is None:
        return dict(q_doc=None, k_doc=None)
    return dict(q_doc=q_doc.to(torch.int32).contiguous(), k_doc=k_doc.to(torch.int32).contiguous())


def _check(q, k, v, layout, block_size, impl, q_doc=None, k_doc=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, Hq, Nq, D = q.shape
    _, Hkv, Nk, Dk = k.shape
    if k.shape[0] != B or Dk != D:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head dim")
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for GQA")
    check_dtypes("block_sparse_attention", DTYPES, DTYPES_WHY, q=q, k=k, v=v)
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    use_triton(q, impl)  # validates impl
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size} has no kernel configuration: use one of {BLOCK_SIZES}")
    for name, n in (("Nq", Nq), ("Nk", Nk)):
        if n % block_size:
            raise ValueError(f"{name}={n} is not divisible by block_size={block_size}: pad the sequence to a multiple of block_size")
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    Bl, Hl, Mq = layout.counts.shape
    if Mq not in (Nq // block_size, Nq):
        raise ValueError(f"layout has {Mq} rows but q has Nq/block_size = {Nq}/{block_size} = {Nq // block_size} "
                         f"query blocks (block layout) or Nq = {Nq} tokens (token layout)")
    if layout.num_k_blocks != Nk // block_size:
        raise ValueError(f"layout has {layout.num_k_blocks} key blocks but k has Nk/block_size = {Nk // block_size}")
    if Hl not in (1, Hkv, Hq):
        raise ValueError(f"layout heads must be 1, Hkv={Hkv} or Hq={Hq}, got {Hl}")
    if Mq == Nq and Hl not in (1, Hkv):
        raise ValueError(f"a token layout is shared by the query heads of a KV group: its heads must be 1 or "
                         f"Hkv={Hkv}, got {Hl}")
    if Bl not in (1, B):
        raise ValueError(f"layout batch must be 1 or B={B}, got {Bl}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}")
    check_doc_pair(q, k, q_doc, k_doc)


def _select_impl(q, layout, impl):
    D = q.shape[-1]
    per_token = layout.num_q_blocks == q.shape[2]
    ref, kernel = (token_sparse_cpu, token_sparse_triton) if per_token else (block_sparse_cpu, block_sparse_triton)
    if not use_triton(q, impl):
        return ref
    if D not in block_sparse_triton.HEAD_DIMS:
        if impl == "triton":
            raise ValueError(f"head dim {D} not supported by the Triton kernel (supported: {block_sparse_triton.HEAD_DIMS}); use impl='torch'")
        if D not in _warned_head_dims:
            _warned_head_dims.add(D)
            warnings.warn(f"block_sparse_attention: head dim {D} has no Triton kernel; using the (slower) PyTorch reference")
        return ref
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import for the CPU interpreter)")
    block_sparse_triton.launch_arch(q)  # ValueError on a GPU older than sm_80, before any launch
    return kernel


def block_sparse_attention(q, k, v, layout: BlockLayout, *, block_size: int = 64, causal: bool = True,
                           sm_scale: float | None = None, q_start: int = 0, k_start: int = 0,
                           return_lse: bool = False, impl: str = "auto", q_doc=None, k_doc=None):
    """Block-sparse softmax attention.

    q: [B, Hq, Nq, D], k, v: [B, Hkv, Nk, D] (Hq a multiple of Hkv; query head
    h reads KV head h // (Hq / Hkv)); layout: BlockLayout with Nk/block_size
    key blocks, batch 1 or B, and rows that are either the Nq/block_size query
    blocks (heads 1, Hkv or Hq) or the Nq query tokens (heads 1 or Hkv: a
    token's selection is shared by its KV group).

        o_i = sum_{j in the active blocks of i's row, visible} softmax_j(sm_scale * q_i . k_j) v_j

    visible means k_start + j <= q_start + i when causal (global positions, so a
    caller holding chunks of a longer sequence gets the right mask) and, given
    document ids q_doc [B, Nq] and k_doc [B, Nk] (integers, non-decreasing along
    each row, as packed documents are numbered; both or neither), q_doc[b, i] ==
    k_doc[b, j]: a packed row attends within its documents. A (query block, key
    block) pair whose documents cannot meet is skipped without reading its K/V.
    A row with no visible key gets o_i = 0 and lse_i = -inf, and zero gradients.

    Returns out [B, Hq, Nq, D] in q.dtype, and lse [B, Hq, Nq] fp32 (natural
    log) when return_lse. impl: "auto" (Triton on CUDA, reference on CPU),
    "triton" or "torch".
    """
    _check(q, k, v, layout, block_size, impl, q_doc, k_doc)
    opts = dict(block_size=block_size, causal=causal, q_start=int(q_start), k_start=int(k_start),
                sm_scale=float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1]),
                **_doc_opts(q_doc, k_doc))
    out, lse = BlockSparseAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), layout,
                                          _select_impl(q, layout, impl), opts)
    return (out, lse) if return_lse else out


def block_sparse_attention_backward(do, q, k, v, lse, delta, layout: BlockLayout, *, block_size: int = 64,
                                    causal: bool = True, sm_scale: float | None = None, q_start: int = 0,
                                    k_start: int = 0, impl: str = "auto", q_doc=None, k_doc=None):
    """The backward of block_sparse_attention from given row statistics, with no forward re-run.

    do, q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; lse, delta: [B, Hq, Nq] fp32 -> (dq, dk, dv) in q.dtype.
    With p_ij = exp(sm_scale q_i . k_j - lse_i) and ds_ij = p_ij (do_i . v_j - delta_i) over the
    layout's visible keys: dq_i = sm_scale sum_j ds_ij k_j, dk_j = sm_scale sum_i ds_ij q_i,
    dv_j = sum_i p_ij do_i. Given the lse and delta = do . o of attention over a longer key set,
    these are the exact gradients of that attention restricted to these keys (ring attention's tiles).
    q_doc [B, Nq], k_doc [B, Nk]: document ids, as in block_sparse_attention.
    """
    _check(q, k, v, layout, block_size, impl, q_doc, k_doc)
    sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    with torch.autocast(q.device.type, enabled=False):  # as in BlockSparseAttention
        return _select_impl(q, layout, impl).backward(
            do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), lse.contiguous(), delta.contiguous(),
            layout, block_size=block_size, causal=causal, sm_scale=sm_scale, q_start=int(q_start),
            k_start=int(k_start), **_doc_opts(q_doc, k_doc))
