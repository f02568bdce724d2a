"""ltrain: long-context language-model training.

Kept import-light on purpose: `ltrain.kernels` must import on a GPU box that
has only torch and triton, and importing it imports this package first.
"""

__version__ = "0.1.0"
