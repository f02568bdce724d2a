"""Where metrics go: console (plus metrics.jsonl in the run dir), wandb, or nowhere.

Only rank 0 tracks; every other rank gets the `none` tracker. Every tracker has
`run_id` (the wandb run id, None otherwise), `log(metrics, step)` and `finish()`.
A run that resumes at step S (`start_step`) first drops the lines of
metrics.jsonl after S, so the steps it replays appear once.
"""

from __future__ import annotations

import json
import netrc
import os
from typing import Optional
from urllib.parse import urlsplit

from tqdm import tqdm

from ltrain.checkpoint import write_atomic
from ltrain.errors import ConfigError


class TrackingError(ConfigError):
    """A tracking setting that cannot work; the message is the one line shown to the user."""


class NoneTracker:
    """Drops everything (non-zero ranks, tracking.backend=none)."""

    run_id: Optional[str] = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class ConsoleTracker(NoneTracker):
    """One line per log step on the console and one JSON object per line in metrics.jsonl."""

    def __init__(self, run_dir: str, start_step: int | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if start_step is not None:
            truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a", buffering=1)

    def log(self, metrics: dict, step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        tqdm.write(format_metrics(metrics, step))

    def finish(self) -> None:
        self._file.close()


class WandbTracker(ConsoleTracker):
    """The console tracker plus a wandb run (offline by default: no network, no account).

    Passing the `run_id` of an earlier run continues that run. Steps at or below the
    highest step already logged to the run (replayed after resuming from the last
    checkpoint) still reach the console and metrics.jsonl but are not sent to wandb,
    which only accepts increasing steps.
    """

    def __init__(self, tracking_cfg, run_dir: str, config: dict | None, run_id: str | None,
                 start_step: int | None = None):
        if tracking_cfg.mode == "online":
            check_wandb_api_key()
        # Before importing wandb: keeps offline wandb from printing its banners.
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        super().__init__(run_dir, start_step)
        self._run = wandb.init(
            project=tracking_cfg.project,
            entity=tracking_cfg.entity,
            tags=list(tracking_cfg.tags) or None,
            mode=tracking_cfg.mode,
            dir=run_dir,
            config=config,
            id=run_id,  # None: wandb makes a new id
            resume="allow",
            # console="off": the console line is already in metrics.jsonl, and wandb's
            # stdout capture fights with tqdm's progress bar.
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run_id = self._run.id
        # An online resume knows the run's next step from the server; an offline run
        # knows nothing about earlier runs, so the highest step sent is also kept in a
        # small file next to wandb's own files.
        self._step_path = os.path.join(run_dir, "wandb", f"ltrain-last-step-{self.run_id}.txt")
        self.last_step = max(self._run.step - 1, _read_int(self._step_path, default=-1))

    def log(self, metrics: dict, step: int) -> None:
        super().log(metrics, step)
        if step <= self.last_step:
            return  # replayed after a resume: already in this wandb run
        self._run.log(metrics, step=step)
        self.last_step = step
        _write_int(self._step_path, step)

    def finish(self) -> None:
        self._run.finish()
        super().finish()


def check_wandb_api_key() -> None:
    """Raise TrackingError if no wandb API key is configured; never touches the network."""
    if os.environ.get("WANDB_API_KEY"):
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):  # None: ~/.netrc
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise TrackingError(
        "tracking.mode='online' is invalid: wandb has no API key; "
        "set WANDB_API_KEY (or run `wandb login`) or use tracking.mode=offline"
    )


def format_metrics(metrics: dict, step: int) -> str:
    parts = [f"step {step}"]
    for key, value in metrics.items():
        if isinstance(value, float):
            text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


def _write_int(path: str, value: int) -> None:
    write_atomic(path, str(value))  # a crash mid-write never leaves a half-written step


def truncate_metrics(path: str, last_step: int) -> None:
    """Keep the lines of metrics.jsonl up to `last_step` (and drop a line cut off by a kill),
    so a run resumed from the checkpoint at `last_step` logs each later step once."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line half-written when the run was killed
    if len(kept) != len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept))


def build_tracker(tracking_cfg, *, rank: int, run_dir: str, config: dict | None = None,
                  run_id: str | None = None, start_step: int | None = None) -> NoneTracker:
    """The tracker for tracking.backend on rank 0; the none tracker everywhere else.

    config is the composed config, logged by wandb; run_id continues an earlier wandb run;
    start_step is the step the run resumes after (0 for a fresh start), None keeps every line.
    """
    if rank != 0 or tracking_cfg.backend == "none":
        return NoneTracker()
    if tracking_cfg.backend == "wandb":
        return WandbTracker(tracking_cfg, run_dir, config, run_id, start_step)
    return ConsoleTracker(run_dir, start_step)
