"""Document ids of packed rows, the argument the kernels and collectives share.

doc_ids [B, N]: integers numbering the documents of each row in order (non-decreasing), so
token i may attend token j only when doc_ids[i] == doc_ids[j]. Their order is the caller's
contract: checking it would read device memory on the host.
"""

from __future__ import annotations

import torch


def check_doc_ids(name: str, ids, shape: tuple[int, ...], device: torch.device, dims: str = "[B, N]") -> None:
    """ValueError naming `name` unless `ids` is an integer tensor of `shape` (`dims` in words) on `device`."""
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != tuple(shape):
        got = list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be {dims} = {list(shape)} document ids, got {got}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (int32 or int64), got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but q is on {device}")


def check_doc_pair(q: torch.Tensor, k: torch.Tensor, q_doc, k_doc) -> None:
    """Query and key ids of attention over q [B, Hq, Nq, D], k [B, Hkv, Nk, D]: both or neither,
    q_doc [B, Nq] and k_doc [B, Nk] integers on q's device."""
    if (q_doc is None) != (k_doc is None):
        given, missing = ("q_doc", "k_doc") if k_doc is None else ("k_doc", "q_doc")
        raise ValueError(f"{given} is given but {missing} is None: pass both document-id tensors or neither")
    if q_doc is not None:
        check_doc_ids("q_doc", q_doc, (q.shape[0], q.shape[2]), q.device, "[B, Nq]")
        check_doc_ids("k_doc", k_doc, (k.shape[0], k.shape[2]), q.device, "[B, Nk]")
