"""The `impl` argument every public kernel op takes: "auto" (Triton on CUDA
tensors, the PyTorch path elsewhere), "triton" or "torch"; and the dtype check the public ops share."""

from __future__ import annotations

import torch

IMPLS = ("auto", "triton", "torch")


def use_triton(x: torch.Tensor, impl: str) -> bool:
    """Whether `impl` asks for the Triton kernel on tensors like x; ValueError for an unknown impl."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl == "triton" or (impl == "auto" and x.is_cuda)


def check_dtypes(op: str, supported: tuple, why: dict, **tensors: torch.Tensor) -> None:
    """One-line ValueError, naming the arguments and the fix, unless the tensors (name=tensor, in
    argument order) share one dtype out of `supported`; `why`: {dtype: why it is refused}, key
    None for any other dtype. Raised before any kernel launch, so no Triton or torch trace follows."""
    names = ", ".join(tensors)
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{name} {dt}" for name, dt in dtypes.items())
        raise ValueError(f"{op}: dtype mismatch: {got}; cast {names} to one dtype of {_names(supported)}")
    dtype = next(iter(dtypes.values()))
    if dtype not in supported:
        reason = why.get(dtype, why[None])
        raise ValueError(f"{op}: {names} have dtype {dtype}, which is not supported ({reason}): "
                         f"cast {names} to one of {_names(supported)}")


def _names(dtypes: tuple) -> str:
    return ", ".join(str(d) for d in dtypes)
