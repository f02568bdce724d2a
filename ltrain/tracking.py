"""Where metrics go: console (plus metrics.jsonl in the run dir) or nowhere.

Only rank 0 tracks; every other rank gets the `none` tracker.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from tqdm import tqdm


class NoneTracker:
    run_id: Optional[str] = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class ConsoleTracker(NoneTracker):
    """One line per log step on the console and one JSON object per line in metrics.jsonl."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)

    def log(self, metrics: dict, step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        tqdm.write(format_metrics(metrics, step))

    def finish(self) -> None:
        self._file.close()


def format_metrics(metrics: dict, step: int) -> str:
    parts = [f"step {step}"]
    for key, value in metrics.items():
        if isinstance(value, float):
            text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


def build_tracker(tracking_cfg, *, rank: int, run_dir: str) -> NoneTracker:
    if rank != 0 or tracking_cfg.backend == "none":
        return NoneTracker()
    return ConsoleTracker(run_dir)
