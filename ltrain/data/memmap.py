"""Training samples read through numpy.memmap from a directory written by ltrain-prepare.

Layout (see ltrain.data.prepare): tokens.bin holds all documents' ids back to
back (each ends with <eos>), docs.idx holds int64 document start offsets
followed by the final end offset [num_docs+1], meta.json the counts.

pack=True:  sample i is tokens[i*seq_len : i*seq_len + seq_len + 1] (samples
            overlap by the one token that is both last label and next input),
            num_samples = (num_tokens - 1) // seq_len.
pack=False: sample i is the first seq_len+1 tokens of the i-th document that
            has at least that many; shorter documents are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ltrain.data.config import DataConfig, DataConfigError, doc_masking

META_VERSION = 1
META, TOKENS, DOCS = "meta.json", "tokens.bin", "docs.idx"


def read_meta(path: str | None) -> dict:
    """meta.json of a prepared directory, after checking both data files' sizes against it."""
    if not path:
        raise DataConfigError("data.path is not set; data.kind=memmap needs the directory written by ltrain-prepare")
    root = Path(path)
    if not (root / META).is_file():
        what = "does not exist" if not root.exists() else f"has no {META} (not written by ltrain-prepare, or unfinished)"
        raise DataConfigError(f"data.path={path}: {what}")
    meta = json.loads((root / META).read_text())
    if meta.get("version") != META_VERSION:
        raise DataConfigError(f"data.path={path}: {META} version {meta.get('version')!r} is not {META_VERSION}; re-run ltrain-prepare")
    for name, count, itemsize in (
        (TOKENS, meta["num_tokens"], np.dtype(meta["dtype"]).itemsize),
        (DOCS, meta["num_docs"] + 1, 8),
    ):
        f = root / name
        if not f.is_file():
            raise DataConfigError(f"data.path={path}: {name} is missing; re-run ltrain-prepare")
        if f.stat().st_size != count * itemsize:
            raise DataConfigError(
                f"data.path={path}: {name} has {f.stat().st_size} bytes but {META} says {count} x {itemsize}; "
                "truncated or stale, re-run ltrain-prepare --force"
            )
    if "max_id" in meta and meta["max_id"] >= meta["vocab_size"]:
        raise DataConfigError(
            f"data.path={path}: {META} says vocab_size {meta['vocab_size']} but {TOKENS} holds id {meta['max_id']}; "
            "the meta.json was edited or is from another tokenizer, re-run ltrain-prepare --force"
        )
    return meta


def max_token_id(path: str, meta: dict) -> int:
    """The largest id in tokens.bin: recorded by ltrain-prepare, or found by one pass for
    a directory prepared before it was recorded."""
    if "max_id" in meta:
        return int(meta["max_id"])
    tokens = np.memmap(Path(path) / TOKENS, dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
    return int(tokens.max()) if len(tokens) else -1


class MemmapSource:
    """Fixed-length samples of a prepared directory (module docstring)."""

    def __init__(self, cfg: DataConfig, meta: dict):
        root = Path(cfg.path)
        self.cfg = cfg
        self.vocab_size: int = meta["vocab_size"]
        self.eos_id: int = meta["eos_id"]
        self.fingerprint = f"memmap-v1:{meta['source_hash']}:{meta['num_tokens']}"
        self.tokens = np.memmap(root / TOKENS, dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
        self.doc_offsets = np.memmap(root / DOCS, dtype=np.int64, mode="r", shape=(meta["num_docs"] + 1,))
        need = cfg.seq_len + 1
        if cfg.pack:
            self.num_samples = (meta["num_tokens"] - 1) // cfg.seq_len
            if self.num_samples == 0:
                raise DataConfigError(
                    f"data.seq_len={cfg.seq_len} needs {need} tokens but data.path={cfg.path} has {meta['num_tokens']}"
                )
        else:
            lengths = np.diff(self.doc_offsets)
            self.starts = np.asarray(self.doc_offsets[:-1][lengths >= need])
            self.num_samples = len(self.starts)
            if self.num_samples == 0:
                raise DataConfigError(
                    f"data.seq_len={cfg.seq_len} with data.pack=false needs documents of >= {need} tokens; "
                    f"the longest in data.path={cfg.path} has {int(lengths.max(initial=0))}: lower seq_len or set pack=true"
                )

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """int64 tokens [seq_len+1] and, with document masking (data.doc_boundaries), their
        document numbers [seq_len+1]."""
        n = self.cfg.seq_len + 1
        start = index * self.cfg.seq_len if self.cfg.pack else int(self.starts[index])
        tokens = np.asarray(self.tokens[start : start + n], dtype=np.int64)
        if not doc_masking(self.cfg):
            return tokens, None
        return tokens, doc_numbers(self.doc_offsets, start, n)


def doc_numbers(doc_offsets: np.ndarray, start: int, n: int) -> np.ndarray:
    """int64 [n]: the document (index into docs.idx) of each token start..start+n-1 of tokens.bin."""
    return (np.searchsorted(doc_offsets, np.arange(start, start + n), side="right") - 1).astype(np.int64, copy=False)


def open_memmap(cfg: DataConfig) -> MemmapSource:
    """Check data.path and open it; DataConfigError (one line, naming the key) on any problem."""
    return MemmapSource(cfg, read_meta(cfg.path))
