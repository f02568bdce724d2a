"""The run lock: a second holder is refused with the first one's pid and host; the
kernel frees it on SIGKILL, so a crashed run never blocks its resume."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ltrain.runlock import LOCK_FILE, RunLockError, acquire

HOLD = "import sys, time; from ltrain.runlock import acquire; acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)"


def hold(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_naming_the_first(tmp_path):
    proc = hold(tmp_path)
    try:
        with pytest.raises(RunLockError) as err:
            acquire(str(tmp_path))
        msg = str(err.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in msg and "LTRAIN_RUN_ID" in msg and "\n" not in msg
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_run_is_free_at_once(tmp_path):
    proc = hold(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the file stays; the lock does not
    start = time.monotonic()
    lock = acquire(str(tmp_path))
    assert time.monotonic() - start < 1.0
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
    lock.release()
    acquire(str(tmp_path)).release()  # and a released lock is free again


def test_unwritable_run_directory_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a directory under a file cannot exist, even for root
    with pytest.raises(RunLockError, match=r"cannot create .*/file/run/ltrain.lock \(Not a directory\), point "
                                           r"trainer.out_dir or hydra.run.dir at a writable directory$"):
        acquire(str(blocker / "run"))
