"""Single-device attention math: Triton kernels and their PyTorch references.

Imports only torch and triton (docs/architecture.md#what-each-layer-may-import). Every op takes
`impl="auto" | "triton" | "torch"`; "auto" is Triton on CUDA tensors and the
reference on CPU.
"""

from .block_sparse import block_sparse_attention, block_sparse_attention_backward
from .layout import BlockLayout
from .s2 import s2_layout
from .lightning import lightning_attention
from .infllm_v2 import infllm_v2_attention, infllm_v2_select
