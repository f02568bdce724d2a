"""InfLLM-V2 attention over a sequence sharded across a context-parallel group.

InfLLM-V2 (kernels/infllm_v2.py) is dense causal attention up to dense_len
tokens and top-k block-sparse attention beyond. Under context parallelism the
switch reads the full length N = n * P, so every rank takes the same branch:

    dense  (N <= dense_len): exact causal attention -- ring attention on the
           causal layout (zigzag) or LASP-2H (contiguous), as the `dense` kind.
    sparse (N >  dense_len): K/V are all-gathered (one collective; its backward
           is one reduce-scatter of dK/dV, lasp2h.GatherKV); each local query
           chunk selects its top-k key blocks over the whole sequence with its
           global q_start (infllm_v2_select on the gathered, detached keys: the
           compression windows straddle chunk boundaries), per token exactly
           as on one device, and attends to them with block_sparse_attention
           (token layout, k_start = 0).
    ulysses: the head split turns each rank's problem into single-device
           InfLLM-V2 on whole sequences, exact when every rank holds whole KV
           groups (Hkv % P == 0): selection sums the scores of a group's query
           heads. Otherwise the sparse path above runs (logged once).

Not yet cheap: the sparse path moves all of K/V, although a query only reads
topk + window/block_size blocks. Gathering only the compressed keys for the
selection and fetching only the selected blocks is the next step; until then
the first call logs why it all-gathers.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ltrain.kernels import BlockLayout, block_sparse_attention, infllm_v2_attention, infllm_v2_select
from ltrain.kernels.infllm_v2 import causal_pairs, check_infllm_v2_params

from . import comm
from .lasp2h import GatherKV, lasp2h_attention
from .ring import chunk_ids, ring_attention
from .sharding import check_sharded_qkv, check_split
from .ulysses import ulysses_attention

log = logging.getLogger("ltrain.parallel")
CP_IMPLS = ("ring", "ulysses")
_logged: set[str] = set()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.info(reason)


def _global_fraction(attended: torch.Tensor, pairs: int, group) -> float:
    """Attended (token, block) pairs summed over ranks / causal pairs of the whole sequence
    (attended_fraction's definition). One small all-reduce, one host sync."""
    total = attended.detach().double().reshape(1).clone()
    comm.all_reduce(total, group=group)
    return total.item() / pairs


def _sparse_gathered(q, k, v, *, group, mode, block_size, impl, select_opts):
    """Sparse InfLLM-V2 for this rank's queries q [B, Hq, n, D] against the
    all-gathered k, v [B, Hkv, N, D] -> (o [B, Hq, n, D], attended (token, block) pairs)."""
    _log_once("infllm_v2_cp_attention: sparse mode all-gathers K/V (selected-block fetch not implemented yet)")
    P, r = dist.get_world_size(group), dist.get_rank(group)
    k_all, v_all = GatherKV.apply(k, v, group, mode)  # in sequence order
    ids = chunk_ids(r, P, mode)
    c = q.shape[2] // len(ids)
    outs, attended = [], q.new_zeros((), dtype=torch.float64)
    for a, ci in enumerate(ids):
        q_c = q[:, :, a * c:(a + 1) * c]
        layout = infllm_v2_select(q_c, k_all.detach(), block_size=block_size, q_start=ci * c, impl=impl,
                                  **select_opts)
        outs.append(block_sparse_attention(q_c, k_all, v_all, layout, block_size=block_size, q_start=ci * c,
                                           k_start=0, impl=impl))
        attended += layout.counts.sum()
    return torch.cat(outs, dim=2), attended


def _dense(q, k, v, *, group, mode, block_size, impl):
    """Exact causal attention over the sharded sequence, as the `dense` kind does it."""
    if mode == "contiguous":
        return lasp2h_attention(q, k, v, group=group)
    return ring_attention(q, k, v, layout_fn=lambda m: BlockLayout.causal(m, m, device=q.device), group=group,
                          block_size=block_size, mode=mode, impl=impl)


def infllm_v2_cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, mode: str = "zigzag",
                           kernel_size: int, kernel_stride: int, block_size: int, topk: int, init_blocks: int,
                           window_size: int, dense_len: int, lse: str = "exact", cp_impl: str = "ring",
                           impl: str = "auto") -> tuple[torch.Tensor, dict]:
    """InfLLM-V2 causal attention over a sequence sharded across `group`.

    q: [B, Hq, n, D], k, v: [B, Hkv, n, D] -- this rank's shard of N = n * P
    tokens, split by `shard_sequence(..., mode=mode)`; N must divide into 2P
    (zigzag) or P (contiguous) chunks of whole blocks. The InfLLM-V2 parameters
    are infllm_v2_attention's. cp_impl: "ring" (sparse: gathered K/V; dense:
    ring attention or LASP-2H) or "ulysses" (head split; needs Hkv % P == 0,
    else the gathered path, logged). group: None for the default group.

    Returns (o [B, Hq, n, D] in q's shard order, stats) with o and stats equal
    to infllm_v2_attention on the gathered sequence: stats = {"mode": "dense" |
    "sparse", "block_fraction": attended / causal block pairs, whole sequence}.
    """
    check_infllm_v2_params(kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size, topk=topk,
                           init_blocks=init_blocks, window_size=window_size, dense_len=dense_len, lse=lse)
    group = group if group is not None else dist.group.WORLD
    check_sharded_qkv(q, k, v, mode)
    if cp_impl not in CP_IMPLS:
        raise ValueError(f"cp_impl={cp_impl!r}: allowed {', '.join(CP_IMPLS)}")
    P = dist.get_world_size(group)
    N, Hkv = q.shape[2] * P, k.shape[1]
    check_split(N, P, mode, block_size, who="infllm_v2_cp_attention")
    params = dict(kernel_size=kernel_size, kernel_stride=kernel_stride, topk=topk, init_blocks=init_blocks,
                  window_size=window_size, lse=lse)

    if cp_impl == "ulysses":
        if Hkv % P == 0:
            return _ulysses(q, k, v, group=group, mode=mode, block_size=block_size, dense_len=dense_len,
                            impl=impl, params=params)
        _log_once(f"infllm_v2_cp_attention: Ulysses needs whole KV groups per rank ({Hkv} KV heads, cp={P}); "
                  "using the gathered-K/V path")
    if N <= dense_len:
        return _dense(q, k, v, group=group, mode=mode, block_size=block_size, impl=impl), \
            {"mode": "dense", "block_fraction": 1.0}
    out, attended = _sparse_gathered(q, k, v, group=group, mode=mode, block_size=block_size, impl=impl,
                                     select_opts=params)
    pairs = q.shape[0] * Hkv * causal_pairs(N, block_size)
    return out, {"mode": "sparse", "block_fraction": _global_fraction(attended, pairs, group)}


def _ulysses(q, k, v, *, group, mode, block_size, dense_len, impl, params):
    """Single-device InfLLM-V2 on whole sequences of Hq/P query heads, Hkv/P KV
    heads per rank. Every rank holds the same number of causal pairs, so the
    global block fraction is the mean of the ranks' fractions."""
    stats = {}

    def attn_fn(q_h, k_h, v_h, head_start):
        out, s = infllm_v2_attention(q_h, k_h, v_h, block_size=block_size, dense_len=dense_len, impl=impl,
                                     **params)
        stats.update(s)
        return out

    out = ulysses_attention(q, k, v, attn_fn=attn_fn, group=group, mode=mode)
    if stats["mode"] == "sparse":
        fraction = torch.tensor(stats["block_fraction"], dtype=torch.float64)
        stats["block_fraction"] = _global_fraction(fraction, dist.get_world_size(group), group)
    return out, stats
