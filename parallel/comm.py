"""Communication accounting: metered wrappers around torch.distributed collectives.

Every collective in parallel/ goes through these wrappers, so a `CommMeter`
can report calls and bytes per collective kind, and tests can assert that a
layer issues exactly the collectives it should (the CommDebugMode idea).

Bytes are the size of the full buffer the collective works on, as seen by
this rank: the gathered output of an all-gather, the unreduced input of a
reduce-scatter, the tensor of an all-reduce, the input of an all-to-all, and
the tensor of a send or recv. Wire traffic depends on the algorithm (a ring
all-gather sends (P-1)/P of its output); the buffer size does not.

    with CommMeter() as meter:
        loss.backward()
    meter.snapshot()  # {"all_gather": {"calls": 1, "bytes": 4096}, ...}
"""

from __future__ import annotations

import torch
import torch.distributed as dist

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send", "recv")

_active: list["CommMeter"] = []

# torch 2.13 renamed these (the old names warn); torch < 2.13 only has the old ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommMeter:
    """Counts calls and bytes per collective kind while entered (meters nest)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.calls = dict.fromkeys(KINDS, 0)
        self.bytes = dict.fromkeys(KINDS, 0)

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {kind: {"calls": self.calls[kind], "bytes": self.bytes[kind]} for kind in KINDS}

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def __enter__(self) -> "CommMeter":
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)


def record(kind: str, tensor: torch.Tensor) -> None:
    """Add one call of `kind` moving `tensor`'s bytes to every active meter."""
    nbytes = tensor.numel() * tensor.element_size()
    for meter in _active:
        meter.calls[kind] += 1
        meter.bytes[kind] += nbytes


def all_gather_into_tensor(output, input, group=None, async_op=False):
    """output: [P * b, ...] (concatenated layout; gloo rejects the stacked one)."""
    record("all_gather", output)
    return _all_gather(output, input, group=group, async_op=async_op)


def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """input: [P * b, ...] (concatenated layout), output: [b, ...]."""
    record("reduce_scatter", input)
    return _reduce_scatter(output, input, op=op, group=group, async_op=async_op)


def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    record("all_reduce", tensor)
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                      async_op=False):
    record("all_to_all", input)
    return dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group,
                                  async_op=async_op)


def isend(tensor, dst, group=None, tag=0):
    """dst: global rank (as torch.distributed.isend)."""
    record("send", tensor)
    return dist.isend(tensor, dst, group=group, tag=tag)


def irecv(tensor, src, group=None, tag=0):
    """src: global rank (as torch.distributed.irecv)."""
    record("recv", tensor)
    return dist.irecv(tensor, src, group=group, tag=tag)


def check_same_shape(group, **tensors: torch.Tensor) -> None:
    """Raise ValueError on every rank if a named tensor's shape differs across `group`.

    One small (metered) all-gather of the shapes; every rank sees the same
    result, so every rank raises together instead of hanging in a later collective.
    """
    shapes = torch.tensor([list(t.shape) for t in tensors.values()], dtype=torch.int64)
    gathered = shapes.new_empty(dist.get_world_size(group) * shapes.shape[0], shapes.shape[1])
    all_gather_into_tensor(gathered, shapes, group=group)
    gathered = gathered.view(-1, *shapes.shape)
    for idx, name in enumerate(tensors):
        per_rank = gathered[:, idx].tolist()
        if any(shape != per_rank[0] for shape in per_rank):
            raise ValueError(f"{name} must have the same shape on every rank of the group (a sequence split "
                             f"evenly into contiguous chunks); got shapes per rank {per_rank}")
