"""One writer per run directory: an flock held by rank 0 for the run's life.

Two runs started with the same run name would interleave metrics.jsonl and
overwrite each other's config and checkpoints. The lock is an advisory
`fcntl.flock` on `<dir>/ltrain.lock`; the kernel drops it when the holding
process dies, SIGKILL included, so a resume after a crash is never blocked
by a stale lock. The file keeps the holder's pid, host and start time for the
message the second run prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

LOCK_FILE = "ltrain.lock"


class RunLockError(RuntimeError):
    """The run directory is in use by another live run; the message names it."""


class RunLock:
    """A held lock; `release()` (or process exit) lets the next run in."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1


def acquire(directory: str) -> RunLock:
    """Lock `directory` for this process or raise RunLockError naming the holder."""
    path = os.path.join(directory, LOCK_FILE)
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunLockError(f"cannot create {path} ({exc.strerror}), point trainer.out_dir or hydra.run.dir "
                           "at a writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunLockError(
            f"{directory} is in use by another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')}), wait for it to finish or give this run another name "
            "(LTRAIN_RUN_ID or trainer.run_name)"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise RunLockError(f"cannot lock {path} ({exc.strerror}), put the run directory on a filesystem "
                           "that supports flock") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    return RunLock(fd, path)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}  # the holder is between taking the lock and writing its name


def acquire_on_rank0(directories: list[str]) -> list[RunLock]:
    """Collective: rank 0 locks each distinct directory (run dir, checkpoint dir); when one
    is held elsewhere every rank raises the same RunLockError, so none waits in a collective."""
    import torch.distributed as dist

    distinct: list[str] = []
    for d in map(os.path.abspath, directories):  # a checkpoint dir inside the run dir needs no lock of its own
        if not any(d == x or d.startswith(x + os.sep) for x in distinct):
            distinct.append(d)
    locks: list[RunLock] = []
    problem: list = [None]
    if dist.get_rank() == 0:
        try:
            for directory in distinct:
                locks.append(acquire(directory))
        except RunLockError as exc:
            for lock in locks:
                lock.release()
            problem[0] = str(exc)
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise RunLockError(problem[0])
    return locks
