"""Data configuration (the `data` group of the Hydra tree): the schema and its
error type. The checks are in ltrain/data/validate.py (generic) and in each
source's module (synthetic.py, memmap.py), so this module imports nothing of
ltrain and every data module can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

KINDS = ("synthetic", "memmap")
TASKS = ("passkey", "recall", "mixed", "multikey", "vartrack")


class DataConfigError(ValueError):
    """A data setting that cannot work; the message is one line naming the key."""


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | memmap
    task: str = "passkey"  # synthetic task: passkey | recall | mixed (passkey/recall, half each) | multikey | vartrack
    path: Optional[str] = None  # memmap: directory written by ltrain-prepare
    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per data-parallel rank per micro step
    pack: bool = True  # memmap: pack documents; False: one sequence per long-enough document
    # Packed documents: emit doc_ids and per-document position_ids, mask the labels across a
    # boundary, and every attention layer attends within a token's own document only (the
    # model takes doc_ids). None: on exactly where a row packs several documents (memmap with
    # pack=true, synthetic with doc_len_min > 0); other rows are one document each (doc_masking()).
    doc_boundaries: Optional[bool] = None
    # synthetic: 0 = every sample fills its row (one document per row); > 0 = every row packs
    # task samples (documents) of log-uniform random lengths in [doc_len_min, seq_len+1]
    # tokens, so one run trains every needle distance up to the row length, with the short
    # ones, where retrieval is learned soonest, among them (data.doc_boundaries on by default).
    doc_len_min: int = 0

    # passkey: a `passkey_digits` number hidden at a depth drawn uniformly from
    # [depth_min, depth_max] (fraction of the filler before it).
    passkey_digits: int = 5
    depth_min: float = 0.0
    depth_max: float = 1.0

    # recall: `recall_pairs` key:value pairs (0 = as many as fit), then one key
    # is queried. Keys are lowercase letters, values digits.
    recall_pairs: int = 0
    recall_key_len: int = 4
    recall_value_len: int = 4

    # multikey: `multikey_keys` "The number for <key> is <value>." needles (keys 4
    # lowercase letters, values passkey_digits digits), the queried one at a depth
    # drawn as for passkey, the others anywhere; the query asks one key's value.
    multikey_keys: int = 4
    # vartrack: a chain VAR A = <number>. VAR B = A. ... of `vartrack_vars` variables
    # (4 uppercase letters) scattered in filler; the query asks which variables hold
    # the number, answered with their names in chain order.
    vartrack_vars: int = 4


def doc_masking(cfg: DataConfig) -> bool:
    """data.doc_boundaries resolved: an explicit true / false, else (None) on where rows pack
    several documents (memmap with pack=true, synthetic with doc_len_min > 0)."""
    if cfg.doc_boundaries is not None:
        return bool(cfg.doc_boundaries)
    return cfg.pack if cfg.kind == "memmap" else cfg.doc_len_min > 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(cfg: DataConfig, key: str) -> None:
    """DataConfigError unless data.<key> is a positive integer."""
    value = getattr(cfg, key)
    if not _is_int(value) or value <= 0:
        raise DataConfigError(f"data.{key}={value!r} must be a positive integer")


def non_negative_int(cfg: DataConfig, key: str, zero: str) -> None:
    """DataConfigError unless data.<key> is an integer >= 0; `zero` says what 0 means."""
    value = getattr(cfg, key)
    if not _is_int(value) or value < 0:
        raise DataConfigError(f"data.{key}={value!r} must be an integer >= 0 (0 = {zero})")
