"""No attention layer waits on the device in its forward or backward once its
caches are warm (the first call of a sequence length builds layouts and ring
plans, reading them on the host; every later call must not).

On CPU a host sync cannot be observed, so `HostSyncCounter` counts the calls
that would be one on a GPU: the Tensor methods that hand a value to Python
(item, tolist, cpu, numpy, bool / int / float / index conversion, nonzero).
It judges the layer code above the kernels, as it runs on CUDA: a call with a
frame of a CPU reference kernel (kernels/block_sparse_cpu.py,
token_sparse_cpu.py) on its stack is excused, since those plan on the host by
design and never run on CUDA; the Triton kernels that replace them there are
judged by the CUDA test below, under torch.cuda.set_sync_debug_mode("error"),
which sees every sync (boolean-mask indexing and device-to-host copies too)
and excuses nothing, on one process. Not seen by the counter: a host-to-device
copy of a Python list (torch.tensor(list, device=...)), which waits on CUDA
too; the collectives make theirs once per geometry (parallel/lasp2*.py).
"""

import sys

import pytest
import torch
import torch.distributed as dist

from ltrain.attention.context import AttnContext
from ltrain.attention.registry import build_attention
from ltrain.config import AttentionConfig, ModelConfig
from ltrain.kernels import block_sparse_cpu, token_sparse_cpu
from ltrain.nn.rope import rope_tables
from ltrain.parallel import shard_sequence
from tests.multiproc import run_ranks

B, HQ, HKV, D, N = 1, 4, 2, 16, 256
INFLLM = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=4, init_blocks=1, window_size=32)
# (kind, regime): every kind's layer, InfLLM-V2 on both sides of dense_len.
LAYERS = [("dense", "dense"), ("s2", "sparse"), ("infllm_v2", "sparse"), ("infllm_v2", "dense")]
# Under cp: every path of the dispatcher (ltrain/attention/context_parallel.py).
CP_CASES = [(kind, regime, cp_impl, False) for kind, regime in LAYERS for cp_impl in ("ring", "ulysses")]
CP_CASES.append(("dense", "dense", "ring", True))  # a hybrid model's dense layer: LASP-2H

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")
CPU_KERNELS = {block_sparse_cpu.__file__, token_sparse_cpu.__file__}


class HostSyncCounter:
    """While entered, records each call of a SYNCS method of torch.Tensor: in `calls`
    as the innermost call site outside torch ("file:line"), or in `excused` when a
    CPU reference kernel is on the stack. An instrument: the methods still run."""

    def __init__(self):
        self.calls: list[str] = []
        self.excused = 0
        self._saved = {}

    def _wrap(self, name):
        original = self._saved[name]

        def counted(*args, **kwargs):
            stack, site = sys._getframe(1), None
            while stack is not None:
                path = stack.f_code.co_filename
                if path in CPU_KERNELS:
                    self.excused += 1
                    break
                if site is None and "/torch/" not in path:
                    site = f"{path}:{stack.f_lineno} ({name})"
                stack = stack.f_back
            else:
                self.calls.append(site)
            return original(*args, **kwargs)

        return counted

    def __enter__(self):
        for name in SYNCS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def layer(kind: str, regime: str, device="cpu"):
    attn = AttentionConfig(pattern="D")
    attn.s2.block_size, attn.s2.local_blocks, attn.s2.vert_stride = 16, 2, 2
    for key, value in {**INFLLM, "dense_len": 64 if regime == "sparse" else N}.items():
        setattr(attn.infllm_v2, key, value)
    torch.manual_seed(0)  # the same weights on every rank
    return build_attention(kind, 0, ModelConfig(dim=HQ * D, n_heads=HQ, n_kv_heads=HKV), attn).to(device)


def inputs(device="cpu"):
    g = torch.Generator().manual_seed(3)
    x, dy = (torch.randn(B, N, HQ * D, generator=g).to(device) for _ in range(2))
    return x, dy, torch.arange(N, device=device).expand(B, N)


def step(module, x, dy, positions, **ctx_args):
    """One forward and backward of the layer on x [B, n, dim] at global positions [B, n]."""
    cos, sin = rope_tables(positions, D)
    ctx = AttnContext(cos=cos, sin=sin, **ctx_args)
    module(x.requires_grad_(), ctx).backward(dy)
    return ctx.stats


def counted_step(module, *args, **ctx_args):
    """(syncs of a warm step, excused syncs) after one step that fills the caches."""
    step(module, *(a.detach().clone() for a in args), **ctx_args)
    with HostSyncCounter() as counter:
        stats = step(module, *args, **ctx_args)
    assert all(isinstance(v, (str, float, torch.Tensor)) for v in stats.values()), stats
    return counter.calls, counter.excused


def test_counter_sees_syncs_and_restores_the_methods():
    original = torch.Tensor.item
    with HostSyncCounter() as counter:
        if torch.ones(2).sum() > 1:  # __bool__
            torch.ones(()).item()
    assert len(counter.calls) == 2 and counter.excused == 0, counter.calls
    assert all(site.startswith(__file__) for site in counter.calls), counter.calls
    assert torch.Tensor.item is original


@pytest.mark.parametrize("kind, regime", LAYERS)
def test_one_process_layer_does_not_sync(kind, regime):
    calls, excused = counted_step(layer(kind, regime), *inputs())
    assert calls == [], calls
    # The counter really sits on this path: the CPU kernel's planning passes through it.
    assert excused > 0 or regime == "dense", excused


@pytest.mark.parametrize("kind, regime", LAYERS)
def test_one_process_layer_with_documents_does_not_sync(kind, regime):
    """Packed documents (boundaries inside blocks): the document mask, InfLLM-V2's
    per-document selection and init blocks add no host sync."""
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([40, 5, 100, 111])).expand(B, N).to(torch.int32)
    calls, _ = counted_step(layer(kind, regime), *inputs(), doc_ids=doc)
    assert calls == [], calls


def _cp_counts(rank, world_size):
    x, dy, positions = (shard_sequence(t, rank, world_size, dim=1) for t in inputs())
    results = {}
    for kind, regime, cp_impl, hybrid in CP_CASES:
        results[kind, regime, cp_impl, hybrid] = counted_step(
            layer(kind, regime), x, dy, positions, cp_group=dist.group.WORLD, cp_impl=cp_impl, hybrid=hybrid)
    return results


def test_context_parallel_layers_do_not_sync_on_two_ranks():
    for results in run_ranks(_cp_counts, 2, timeout=300):
        for case, (calls, excused) in results.items():
            assert calls == [], (case, calls)
            assert excused > 0 or case[1] == "dense", (case, excused)  # sparse layers run the CPU kernel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the sync debug mode sees every device sync")
@pytest.mark.parametrize("kind, regime", LAYERS)
def test_cuda_layer_does_not_sync(kind, regime):
    module, (x, dy, positions) = layer(kind, regime, "cuda"), inputs("cuda")
    step(module, x.clone(), dy, positions)  # compiles the kernels, fills the caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(module, x, dy, positions)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
