"""Single-device attention math: Triton kernels and their PyTorch references.

Imports only torch and triton (see ARCHITECTURE.md). Every op takes
`impl="auto" | "triton" | "torch"`; "auto" is Triton on CUDA tensors and the
reference on CPU.
"""
