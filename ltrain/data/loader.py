"""Batches for one data-parallel rank, from a global stream that depends on the seed only.

Global micro-step g consumes sequences [g*B*dp, (g+1)*B*dp) of the sampler's
order (B = micro_batch_size, dp = dp_size) and rank r takes the contiguous
slice [r*B, (r+1)*B) of them. So dp=1 with micro batch 2B yields exactly the
concatenation of what dp=2 ranks with micro batch B get at the same step.

State is counted in sequences of the global order, not in steps, so a run may
resume with another dp_size or micro_batch_size and continue exactly where
the global order stopped: nothing is dropped or repeated.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ltrain.data.config import DataConfig, doc_masking
from ltrain.data.memmap import open_memmap
from ltrain.data.sampler import Sampler
from ltrain.data.synthetic import SyntheticSource
from ltrain.data.validate import validate_data_config

log = logging.getLogger("ltrain.data")

STATE_VERSION = 1


class DataStateError(ValueError):
    """A saved data-loader state that cannot continue this run."""


def make_batch(tokens: np.ndarray, docs: np.ndarray | None) -> dict[str, torch.Tensor]:
    """Model inputs from sequences of seq_len+1 tokens.

    tokens: int64 [B, N+1]; docs: per-token document numbers [B, N+1] or None.
    Returns input_ids, labels [B, N] and, when docs is given, doc_ids
    (0 for the first document of each row, +1 at each new one) and
    position_ids (restarting at 0 at each document start; the row's first,
    possibly partial, document starts at 0 too). Labels that would predict
    across a document boundary are -100.
    """
    t = torch.from_numpy(tokens)
    batch = {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}
    if docs is None:
        return batch
    d = torch.from_numpy(docs - docs[:, :1])
    batch["labels"][d[:, 1:] != d[:, :-1]] = -100
    doc_ids = d[:, :-1].contiguous()
    idx = torch.arange(doc_ids.shape[1]).expand_as(doc_ids)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.where(new_doc, idx, torch.zeros_like(idx)).cummax(dim=1).values
    batch["doc_ids"] = doc_ids
    batch["position_ids"] = idx - starts
    return batch


class Loader:
    """See the module docstring; build with build_loader()."""

    def __init__(self, cfg: DataConfig, source, *, seed: int, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside dp_size={dp_size}")
        self.cfg, self.source = cfg, source
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.vocab_size: int = source.vocab_size
        self.sampler = Sampler(source.num_samples, seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's micro batch: LongTensors [micro_batch_size, seq_len] (see make_batch)."""
        b = self.cfg.micro_batch_size
        indices = self.sampler.take(b * self.dp_size)[self.dp_rank * b : (self.dp_rank + 1) * b]
        rows = [self.source.sample(int(i)) for i in indices]
        docs = None
        if doc_masking(self.cfg):
            docs = np.stack([d if d is not None else np.zeros_like(t) for t, d in rows])
        return make_batch(np.stack([t for t, _ in rows]), docs)

    def state_dict(self) -> dict:
        """Plain ints and strings: everything needed to continue bit-for-bit."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.source.fingerprint,
            **self.sampler.state_dict(),
            "seq_len": self.cfg.seq_len,
            "micro_batch_size": self.cfg.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION:
            raise DataStateError(f"data loader state version {sd.get('version')!r} is not {STATE_VERSION}")
        if sd["fingerprint"] != self.source.fingerprint:
            raise DataStateError(
                f"the checkpoint was trained on dataset {sd['fingerprint']} but data.* now gives "
                f"{self.source.fingerprint}; resume with the same data (or start a new run)"
            )
        if sd["seed"] != self.seed:
            raise DataStateError(f"the checkpoint's data seed is {sd['seed']} but this run's is {self.seed}; resume with seed={sd['seed']}")
        if (sd["dp_size"], sd["micro_batch_size"]) != (self.dp_size, self.cfg.micro_batch_size):
            log.warning(
                "data-parallel size %d -> %d, micro batch %d -> %d: the global sequence order depends only on "
                "the seed, so the sampler continues at epoch %d, sequence %d of it with the new global batch "
                "of %d sequences; no data is dropped or repeated",
                sd["dp_size"], self.dp_size, sd["micro_batch_size"], self.cfg.micro_batch_size,
                sd["epoch"], sd["position"], self.dp_size * self.cfg.micro_batch_size,
            )
        if sd["seq_len"] != self.cfg.seq_len or sd["num_samples"] != self.source.num_samples:
            sd = self._rescale(sd)
        self.sampler.load_state_dict(sd)

    def _rescale(self, sd: dict) -> dict:
        """Continue after data.seq_len (or data.pack) changed, which re-cuts the same data into other samples."""
        old, new = sd["num_samples"], self.source.num_samples
        position = sd["position"] if new is None else sd["position"] * new // old
        log.warning(
            "data re-cut into other samples (data.seq_len %d -> %d, %s -> %s samples per epoch): "
            "continuing epoch %d at the same fraction of it, sample %d (was %d)%s",
            sd["seq_len"], self.cfg.seq_len, old or "endless", new or "endless", sd["epoch"], position,
            sd["position"], "" if new is None else ", in the order drawn for the new sample count",
        )
        return {**sd, "num_samples": new, "position": position}


def build_loader(cfg: DataConfig, *, seed: int, dp_rank: int, dp_size: int) -> Loader:
    """Validate `cfg` and build this rank's loader (rank `dp_rank` of `dp_size`)."""
    validate_data_config(cfg)
    source = SyntheticSource(cfg, seed) if cfg.kind == "synthetic" else open_memmap(cfg)
    return Loader(cfg, source, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
