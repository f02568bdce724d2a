"""Deterministic, resumable order over N samples (or an endless stream).

Epoch e visits the samples in the permutation drawn by a numpy Generator
seeded with [seed, e]. The generator is re-derived from (seed, epoch) rather
than carried along, so (seed, epoch, position) is the complete state: there is
no hidden stream state a checkpoint could miss. With num_samples=None the
order is simply 0, 1, 2, ... (synthetic samples are already random).

Every data-parallel rank runs the same sampler and takes its slice of each
global batch (see ltrain.data.loader), so ranks never need to communicate.
"""

from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, num_samples: int | None, seed: int):
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"a sampler needs at least one sample, got num_samples={num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.position = 0  # samples already taken in this epoch (endless stream: in total)
        self._perm: np.ndarray | None = None  # permutation of self.epoch, built lazily

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        return self._perm

    def take(self, count: int) -> np.ndarray:
        """The next `count` sample indices (int64 [count]), crossing epochs as needed."""
        if self.num_samples is None:
            out = np.arange(self.position, self.position + count, dtype=np.int64)
            self.position += count
            return out
        parts = []
        while count > 0:
            n = min(count, self.num_samples - self.position)
            parts.append(self._permutation()[self.position : self.position + n])
            self.position += n
            count -= n
            if self.position == self.num_samples:
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, np.int64)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_samples": self.num_samples}

    def load_state_dict(self, sd: dict) -> None:
        if sd["num_samples"] != self.num_samples or sd["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for num_samples={sd['num_samples']}, seed={sd['seed']}; "
                f"this sampler has num_samples={self.num_samples}, seed={self.seed}"
            )
        self.epoch, self.position, self._perm = int(sd["epoch"]), int(sd["position"]), None
