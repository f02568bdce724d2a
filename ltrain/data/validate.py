"""Validation of the `data` config: the generic checks, then the source's own
(synthetic.validate_synthetic, memmap.open_memmap). Runs when the config is
composed, before any process group exists, so it must not touch
torch.distributed; every failure is one line that names the key, the bad
value and what is allowed."""

from __future__ import annotations

from ltrain.data.config import KINDS, DataConfig, DataConfigError, positive_int
from ltrain.data.memmap import open_memmap
from ltrain.data.synthetic import validate_synthetic


def validate_data_config(cfg: DataConfig) -> None:
    """Raise DataConfigError for a setting that would fail later (see module doc)."""
    if cfg.kind not in KINDS:
        raise DataConfigError(f"data.kind={cfg.kind!r} is not one of {', '.join(KINDS)}")
    for key in ("seq_len", "micro_batch_size"):
        positive_int(cfg, key)
    if cfg.kind == "synthetic":
        validate_synthetic(cfg)
    else:
        open_memmap(cfg)  # checks path, meta.json, tokens.bin size and pack=False lengths
