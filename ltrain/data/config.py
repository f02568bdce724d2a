"""Data configuration (the `data` group of the Hydra tree) and its validation.

Validation runs when the config is composed, before any process group
exists, so it must not touch torch.distributed; every failure is one line
that names the key, the bad value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

KINDS = ("synthetic", "memmap")
TASKS = ("passkey", "recall", "mixed")


class DataConfigError(ValueError):
    """A data setting that cannot work; the message is one line naming the key."""


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | memmap
    task: str = "passkey"  # synthetic task: passkey | recall | mixed (half each)
    path: Optional[str] = None  # memmap: directory written by ltrain-prepare
    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per data-parallel rank per micro step
    pack: bool = True  # memmap: pack documents; False: one sequence per long-enough document
    doc_boundaries: bool = False  # also emit position_ids / doc_ids, mask cross-document labels

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


def _positive_int(cfg: DataConfig, key: str) -> None:
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataConfigError(f"data.{key}={value!r} must be a positive integer")


def validate_data_config(cfg: DataConfig) -> None:
    """Raise DataConfigError for a setting that would fail later (see module doc)."""
    if cfg.kind not in KINDS:
        raise DataConfigError(f"data.kind={cfg.kind!r} is not one of {', '.join(KINDS)}")
    for key in ("seq_len", "micro_batch_size"):
        _positive_int(cfg, key)
    if cfg.kind == "synthetic":
        _validate_synthetic(cfg)
    else:
        # Imported here: memmap.py imports this module for DataConfigError.
        from ltrain.data.memmap import open_memmap

        open_memmap(cfg)  # checks path, meta.json, tokens.bin size and pack=False lengths


def _validate_synthetic(cfg: DataConfig) -> None:
    if cfg.task not in TASKS:
        raise DataConfigError(f"data.task={cfg.task!r} is not one of {', '.join(TASKS)}")
    for key in ("passkey_digits", "recall_key_len", "recall_value_len"):
        _positive_int(cfg, key)
    if not 0.0 <= cfg.depth_min <= cfg.depth_max <= 1.0:
        raise DataConfigError(
            f"data.depth_min={cfg.depth_min!r}, data.depth_max={cfg.depth_max!r}: "
            "need 0 <= depth_min <= depth_max <= 1"
        )
    if isinstance(cfg.recall_pairs, bool) or not isinstance(cfg.recall_pairs, int) or cfg.recall_pairs < 0:
        raise DataConfigError(f"data.recall_pairs={cfg.recall_pairs!r} must be an integer >= 0 (0 = as many as fit)")
    if cfg.task != "passkey" and cfg.recall_pairs > 26**cfg.recall_key_len:
        raise DataConfigError(
            f"data.recall_pairs={cfg.recall_pairs} exceeds the {26**cfg.recall_key_len} distinct keys "
            f"of data.recall_key_len={cfg.recall_key_len}; raise recall_key_len"
        )
    from ltrain.data.synthetic import min_seq_len

    need = min_seq_len(cfg)
    if cfg.seq_len < need:
        raise DataConfigError(f"data.seq_len={cfg.seq_len} is too short for data.task={cfg.task} (needs >= {need})")
