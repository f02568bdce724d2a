"""Attention kinds. Importing this package registers every kind."""

from ltrain.attention import dense  # noqa: F401  (registers "dense")
from ltrain.attention import linear  # noqa: F401  (registers "linear")
from ltrain.attention import s2  # noqa: F401  (registers "s2")
from ltrain.attention import infllm_v2  # noqa: F401
