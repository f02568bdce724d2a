"""Attention kinds by name and letter, so a config picks each layer's kind and
later kinds plug in without touching the model.

A kind registers a builder `build(layer_idx, model_cfg, attn_cfg) -> nn.Module`
whose module maps `x: [B, N, dim]` and an AttnContext to `[B, N, dim]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import nn


@dataclass(frozen=True)
class AttentionKind:
    name: str
    letter: str
    build: Callable[..., nn.Module]


_KINDS: dict[str, AttentionKind] = {}


def register(name: str, letter: str):
    """Decorator: `@register("dense", "D") def build(layer_idx, model_cfg, attn_cfg)`."""

    def deco(build):
        for kind in _KINDS.values():
            if kind.letter == letter and kind.name != name:
                raise ValueError(f"attention letter {letter!r} is taken by {kind.name!r}")
        _KINDS[name] = AttentionKind(name, letter, build)
        return build

    return deco


def known_kinds() -> dict[str, str]:
    """{name: letter} of every registered kind."""
    return {k.name: k.letter for k in _KINDS.values()}


def resolve_layer_kinds(pattern: str, layers: Optional[Sequence[str]], n_layers: int) -> list[str]:
    """Each layer's kind name, from an explicit list or a repeating letter pattern.

    `"SSSD"` with 8 layers gives s2, s2, s2, dense, s2, s2, s2, dense.
    """
    names = known_kinds()
    if layers:
        if len(layers) != n_layers:
            raise ValueError(
                f"attention.layers has {len(layers)} entries but model.n_layers={n_layers}; "
                "list one kind per layer or use attention.pattern"
            )
        for i, name in enumerate(layers):
            if name not in names:
                raise ValueError(
                    f"attention.layers[{i}]={name!r} is not a known attention kind; "
                    f"allowed: {', '.join(sorted(names))}"
                )
        return list(layers)
    by_letter = {letter: name for name, letter in names.items()}
    if not pattern:
        raise ValueError("attention.pattern is empty; give one letter per layer, e.g. 'D' or 'SSSD'")
    for ch in pattern:
        if ch not in by_letter:
            allowed = ", ".join(f"{letter}={name}" for letter, name in sorted(by_letter.items()))
            raise ValueError(
                f"attention.pattern={pattern!r} has unknown letter {ch!r}; allowed: {allowed}"
            )
    return [by_letter[pattern[i % len(pattern)]] for i in range(n_layers)]


def build_attention(kind: str, layer_idx: int, model_cfg, attn_cfg) -> nn.Module:
    return _KINDS[kind].build(layer_idx, model_cfg, attn_cfg)
