"""Without a GPU every Triton kernel must have been decorated in interpreter mode.

triton.jit chooses at decoration time, so a test module that imports a kernel
during collection before TRITON_INTERPRET=1 is set leaves compiled-mode kernels
behind, and every Triton test then fails with "0 active drivers" (tests/conftest.py)."""

import importlib

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

MODULES = ["kernels.block_sparse_triton", "kernels.token_sparse_triton", "kernels.infllm_v2_triton",
           "kernels.lightning_triton"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels are compiled, as they should be")
@pytest.mark.parametrize("name", MODULES)
def test_every_kernel_is_interpreted(name):
    module = importlib.import_module(name)
    kernels = {k: v for k, v in vars(module).items() if isinstance(v, (JITFunction, InterpretedFunction))}
    assert kernels, f"{name} defines no Triton kernel"
    compiled = sorted(k for k, v in kernels.items() if not isinstance(v, InterpretedFunction))
    assert not compiled, f"{name}: {compiled} were decorated before TRITON_INTERPRET=1 was set"
