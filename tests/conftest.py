"""Triton kernels run in the interpreter when there is no GPU (docs/architecture.md#testing-without-a-gpu).

Set in the root conftest, which pytest imports before it collects any test module: triton.jit
picks interpreter or compiler when a kernel is decorated, and modules outside tests/kernels
(tests/benchmarks, tests/ltrain) import kernels at collection time too."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
