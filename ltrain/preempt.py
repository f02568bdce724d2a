"""Stop requests from signals, decided alike on every rank at a step boundary.

    SIGTERM           save a checkpoint after the current step, then exit
    SIGUSR1           the same, and under SLURM requeue the job afterwards
                      (launch/slurm.sbatch asks SLURM for it before the time limit)
    Ctrl-C (SIGINT)   exit after the current step without saving; a second
                      Ctrl-C ends the process at once

The handlers only record the request. The training loop sends `flags()` along
with its per-step loss all-reduce and calls `decide()` on the reduced values,
so every rank takes the same decision at the same step: no rank starts a
collective save that another skips, and no extra collective is needed. A
signal that reaches only some ranks (one node pre-empted, or `kill` of one
process) still stops all of them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

log = logging.getLogger("ltrain.preempt")

# Positions in the flag vector: counts of ranks asking to save, to exit, to requeue.
SAVE, EXIT, REQUEUE = range(3)
N_FLAGS = 3

_flags = [0.0] * N_FLAGS
_received: list[str] = []


@dataclass(frozen=True)
class Stop:
    save: bool  # write a checkpoint at this step before exiting
    requeue: bool  # a SIGUSR1 under SLURM: requeue the job once the checkpoint is complete
    reason: str  # the signals this rank received, for the log line


def _on_save_signal(signum, _frame) -> None:
    _flags[SAVE] = 1.0
    if signum == signal.SIGUSR1 and os.environ.get("SLURM_JOB_ID"):
        _flags[REQUEUE] = 1.0
    _received.append(signal.Signals(signum).name)


def _on_interrupt(signum, _frame) -> None:
    _flags[EXIT] = 1.0
    _received.append(signal.Signals(signum).name)
    # The default action from now on: a second Ctrl-C ends the process at once, even
    # inside a collective, where a Python handler would only run after it returns.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if os.environ.get("RANK", "0") == "0":  # every rank gets the terminal's Ctrl-C; one line is enough
        print("ltrain: interrupted: stopping after this step without saving (Ctrl-C again to exit at once)",
              file=sys.stderr, flush=True)


def install() -> None:
    """Route SIGTERM, SIGUSR1 and SIGINT to the stop flags (main thread, once per process).

    Installed before the slow start-up (imports, DeepSpeed), so a signal that
    arrives then is not lost or fatal: it takes effect after the first step.
    """
    signal.signal(signal.SIGTERM, _on_save_signal)
    signal.signal(signal.SIGUSR1, _on_save_signal)
    signal.signal(signal.SIGINT, _on_interrupt)


def flags() -> list[float]:
    """This rank's requests, to be summed over all ranks (1.0 where asked, else 0.0)."""
    return list(_flags)


def decide(reduced: list[float]) -> Stop | None:
    """The decision from the flags summed over every rank; None: keep training."""
    if not any(reduced[:N_FLAGS]):
        return None
    reason = ", ".join(dict.fromkeys(_received)) or "a signal to another rank"
    stop = Stop(save=reduced[SAVE] > 0, requeue=reduced[REQUEUE] > 0, reason=reason)
    if stop.save and signal.getsignal(signal.SIGTERM) is _on_save_signal:
        # The rank is on its way out. A later SIGTERM (the requeue's, or SLURM's after
        # its warning) must not kill it mid-save or while the interpreter shuts down,
        # when Python has already put the default action back; SLURM's SIGKILL after
        # KillWait stays the hard stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return stop


def requeue() -> bool:
    """`scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue and its next
    start resumes from the checkpoint just written (one rank calls this, after it)."""
    job = os.environ["SLURM_JOB_ID"]
    if "wandb" in sys.modules:
        # Requeueing signals every process of the job, wandb's service too; close the
        # connection to it now rather than in an atexit hook that would find it gone.
        sys.modules["wandb"].teardown()
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("ltrain: slurm error: cannot requeue job %s (%s), resubmit it to continue from the checkpoint",
                  job, exc)
        return False
    if proc.returncode:
        log.error("ltrain: slurm error: scontrol requeue %s failed (%s), resubmit it to continue from the checkpoint",
                  job, proc.stderr.strip() or f"exit {proc.returncode}")
        return False
    log.info("requeued SLURM job %s: it continues from this checkpoint (trainer.resume=auto)", job)
    return True
