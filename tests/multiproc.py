"""Run a function on N real processes over gloo and collect what each returns.

The OLMo-core `run_distributed_test` pattern: real processes, a real process
group, no mocks. `fn(rank, world_size, *args)` must be a module-level function
(spawned children import it by name). Each rank's return value comes back in
rank order; an exception on any rank fails the caller with that rank's
traceback, and a hang (gloo p2p has been seen to hang elsewhere) fails after
`timeout` seconds instead of blocking the suite.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Two cores on CI: N ranks each grabbing every core only thrash.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # Plain pickle bytes: torch's queue would share tensors through file
        # descriptors that die with this process before the parent reads them.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - the traceback is the report
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except Exception as exc:  # queue.Empty
                raise TimeoutError(
                    f"{fn.__name__} on {world_size} gloo ranks produced no result within "
                    f"{timeout:.0f}s (a collective is probably waiting on a rank that never "
                    f"called it); got ranks {sorted(results)}"
                ) from exc
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError(f"{fn.__name__} failed on {world_size} gloo ranks:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
