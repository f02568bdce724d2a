"""Attention kinds by name and letter: each kind is one module that registers
everything ltrain needs to know about it, so a config picks each layer's kind
and a new kind plugs in without touching the model or the config schema.

`register(name, letter, config=..., validate=..., block_size=..., softmax=...)`
decorates the kind's builder:

    build(layer_idx, model_cfg, attn_cfg) -> nn.Module   maps x: [B, N, dim] and an
                        AttnContext to [B, N, dim]; attn_cfg.<name> is the kind's section
    config              dataclass of the section `attention.<name>` (None: no settings)
    validate(cfg, kinds)  the checks that need more than types, raising ConfigError that
                        names the key; ltrain.config.validate calls it when some layer is of
                        this kind (cfg: the whole TrainConfig; kinds: every kind the model uses)
    block_size(cfg)     tokens per attention block: each context-parallel chunk holds whole blocks
    softmax             False for a kind without a softmax (linear): a model with one is
                        hybrid, and its dense layers take LASP-2H under context parallelism
    removed             {key: why} of settings the section once had: an override of one is
                        refused with the reason

ltrain.config builds the schema's `attention` section from the registered
sections and never names a kind. This module imports nothing heavy, and kind
modules import their kernels and collectives inside the functions that run
them: reading the kinds' sections and validators (ltrain.config does at
import) loads no kernel, collective or Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from ltrain.errors import config_error


@dataclass(frozen=True)
class AttentionKind:
    name: str
    letter: str
    build: Callable
    config: Optional[type] = None
    validate: Optional[Callable] = None
    block_size: Optional[Callable] = None
    softmax: bool = True
    removed: dict = field(default_factory=dict)


_KINDS: dict[str, AttentionKind] = {}


def register(name: str, letter: str, *, config: Optional[type] = None, validate: Optional[Callable] = None,
             block_size: Optional[Callable] = None, softmax: bool = True, removed: Optional[dict] = None):
    """Decorator: `@register("s2", "S", config=S2Config, validate=validate) def build(layer_idx, model_cfg, attn_cfg)`."""

    def deco(build):
        for kind in _KINDS.values():
            if kind.letter == letter and kind.name != name:
                raise ValueError(f"attention letter {letter!r} is taken by {kind.name!r}")
        _KINDS[name] = AttentionKind(name, letter, build, config, validate, block_size, softmax, removed or {})
        return build

    return deco


def kinds() -> dict[str, AttentionKind]:
    """Every registered kind by name (importing this module ran ltrain/attention/__init__.py,
    which imports, so registers, the built-in kinds)."""
    return dict(_KINDS)


def known_kinds() -> dict[str, str]:
    """{name: letter} of every registered kind."""
    return {k.name: k.letter for k in kinds().values()}


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


def is_hybrid(layer_kinds: Iterable[str]) -> bool:
    """A model is hybrid when some layer's kind has no softmax (linear attention)."""
    registered = kinds()
    return any(not registered[k].softmax for k in layer_kinds)


def build_attention(kind: str, layer_idx: int, model_cfg, attn_cfg):
    return kinds()[kind].build(layer_idx, model_cfg, attn_cfg)


def check_ulysses_heads(cfg) -> None:
    """What a layer that splits heads under parallel.cp_impl=ulysses needs (a kind's validator
    calls it when its layers take that path): query heads divisible by cp, and KV heads either
    divisible by cp or dividing it (then replicated)."""
    p, m = cfg.parallel, cfg.model
    if p.cp == 1 or p.cp_impl != "ulysses":
        return
    if m.n_heads % p.cp:
        raise config_error("parallel.cp", p.cp, f"Ulysses needs model.n_heads={m.n_heads} divisible by parallel.cp")
    if m.n_kv_heads % p.cp and p.cp % m.n_kv_heads:
        raise config_error("parallel.cp", p.cp, f"Ulysses needs model.n_kv_heads={m.n_kv_heads} divisible by "
                           "parallel.cp, or parallel.cp divisible by it (KV heads are then replicated)")
