"""Triton kernels run in the interpreter when there is no GPU (docs/architecture.md#testing-without-a-gpu).

Set before any test module imports a kernel: triton.jit picks interpreter or
compiler when the kernel is decorated."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
