"""Attention kinds. Importing this package registers every kind."""

from ltrain.attention import dense  # noqa: F401  (registers "dense")
