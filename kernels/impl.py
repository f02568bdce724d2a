"""The `impl` argument every public kernel op takes: "auto" (Triton on CUDA
tensors, the PyTorch path elsewhere), "triton" or "torch"."""

from __future__ import annotations

import torch

IMPLS = ("auto", "triton", "torch")


def use_triton(x: torch.Tensor, impl: str) -> bool:
    """Whether `impl` asks for the Triton kernel on tensors like x; ValueError for an unknown impl."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl == "triton" or (impl == "auto" and x.is_cuda)
