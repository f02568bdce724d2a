"""Sequence-parallel benchmarks on real gloo processes (CPU) or one node of GPUs.

Section "linear": one linear-attention layer (fwd + bwd per step), sequence
split contiguously over P ranks, three schedules:

    lasp2       ltrain.parallel.lasp2_linear_attention: one all-gather of the
                [B, H, Dk, Dv] memory states per pass.
    lasp1_ring  LASP-1-style state ring: rank r waits for prefix_{r} from r-1,
                sends prefix_r + M_r on to r+1 (P-1 sequential hops per pass).
    ring_kv     ring attention over K/V: every rank's K and V travel the ring
                (P-1 hops); a rank adds k_s^T v_s of each earlier rank's block
                to its prefix state (the cheaper right-product form of
                q^T (k v^T)). Backward: K, V and fp32 dK/dV accumulators travel
                again, dK/dV returning to their owner after P hops.

Shapes: B=1, H=2, Dk=Dv=16, fp32, no decay, kernel chunk 64 (the PyTorch
reference kernel on CPU), so 1M tokens fit in a few GiB across ranks. Each
rank runs with one thread (tests/multiproc.run_ranks). Bytes are the comm
meter's buffer bytes per rank per step (all kinds summed, max over ranks: see
parallel/comm.py for the convention); time is the max over ranks of one
fwd+bwd step, median over the timed steps.

Sections are entries of SECTIONS: a function (args) -> list of row dicts; the
JSON and Markdown writers take any rows. Run from the repo root:

    python -m benchmarks.sequence_parallel [--seq-lens 16384,262144] [--world-sizes 2,4]

The default (16K, 64K, 256K on 2 and 4 ranks) takes about 2 minutes on 2
shared cores; the committed results were made with
--seq-lens 16384,65536,262144,1048576 --steps 3 (about 8 minutes).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ltrain.kernels.lightning import lightning_bwd, lightning_fwd
from ltrain.parallel import CommMeter, comm, lasp2_linear_attention
from tests.multiproc import run_ranks

B, H, D, CHUNK = 1, 2, 16, 64


def _ring_shift(tensor: torch.Tensor) -> torch.Tensor:
    """Send `tensor` to rank r+1, return what rank r-1 sent."""
    rank, P = dist.get_rank(), dist.get_world_size()
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, (rank + 1) % P), dist.P2POp(dist.irecv, received, (rank - 1) % P)]
    for req in comm.batch_isend_irecv(ops):
        req.wait()
    return received


def _kv_state(k, v):
    return torch.einsum("bhcd,bhce->bhde", k.float(), v.float())


class _Lasp1Ring(torch.autograd.Function):
    """prefix_r arrives from r-1; the gradient of M_r arrives from r+1 (P-1 sequential hops each)."""

    @staticmethod
    def forward(ctx, q, k, v):
        rank, P = dist.get_rank(), dist.get_world_size()
        prefix = torch.zeros(B, H, D, D)
        if rank > 0:
            comm.irecv(prefix, rank - 1).wait()
        if rank < P - 1:
            comm.isend(prefix + _kv_state(k, v), rank + 1).wait()
        ctx.save_for_backward(q, k, v, prefix)
        return lightning_fwd(q, k, v, None, prefix, CHUNK)[0]

    @staticmethod
    def backward(ctx, do):
        q, k, v, prefix = ctx.saved_tensors
        rank, P = dist.get_rank(), dist.get_world_size()
        d_memory = torch.zeros(B, H, D, D)
        if rank < P - 1:
            comm.irecv(d_memory, rank + 1).wait()
        if rank > 0:
            comm.isend(d_memory + _kv_state(q, do), rank - 1).wait()
        return lightning_bwd(q, k, v, None, prefix, do, d_memory, CHUNK)[:3]


class _RingKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        rank, P = dist.get_rank(), dist.get_world_size()
        prefix = torch.zeros(B, H, D, D)
        block = torch.stack([k, v])
        for step in range(1, P):
            block = _ring_shift(block)
            if (rank - step) % P < rank:
                prefix += _kv_state(block[0], block[1])
        ctx.save_for_backward(q, k, v, prefix)
        return lightning_fwd(q, k, v, None, prefix, CHUNK)[0]

    @staticmethod
    def backward(ctx, do):
        q, k, v, prefix = ctx.saved_tensors
        rank, P = dist.get_rank(), dist.get_world_size()
        dq, dk, dv, _ = lightning_bwd(q, k, v, None, prefix, do, None, CHUNK)
        g = _kv_state(q, do)
        block = torch.stack([k, v, torch.zeros_like(k), torch.zeros_like(v)])
        for step in range(1, P):
            block = _ring_shift(block)
            if (rank - step) % P < rank:
                block[2] += block[1] @ g.transpose(-1, -2)
                block[3] += block[0] @ g
        grads = _ring_shift(block[2:].contiguous())
        return dq, dk + grads[0], dv + grads[1]


SCHEDULES = {
    "lasp2": lambda q, k, v: lasp2_linear_attention(q, k, v, None, chunk_size=CHUNK),
    "lasp1_ring": _Lasp1Ring.apply,
    "ring_kv": _RingKV.apply,
}


def _time_linear(rank, world_size, seq_len, steps):
    C = seq_len // world_size
    g = torch.Generator().manual_seed(rank)
    q, k, v, do = (torch.randn(B, H, C, D, generator=g) for _ in range(4))
    times = {name: [] for name in SCHEDULES}
    meters = {name: CommMeter() for name in SCHEDULES}
    # Schedules take turns within each step, so load from neighbours on a shared
    # machine drifts over all of them alike; step 0 warms allocators and gloo.
    for step in range(steps + 1):
        for name, attend in SCHEDULES.items():
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            dist.barrier()
            meters[name].reset()
            start = time.perf_counter()
            with meters[name]:
                attend(*leaves).backward(do)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step > 0:
                times[name].append(elapsed.item())
    rows = []
    for name, meter in meters.items():
        nbytes = torch.tensor([meter.total_bytes()], dtype=torch.float64)
        dist.all_reduce(nbytes, op=dist.ReduceOp.MAX)
        rows.append(dict(section="linear", schedule=name, world_size=world_size, seq_len=seq_len,
                         bytes_per_step=int(nbytes.item()), step_s=statistics.median(times[name]),
                         step_s_all=times[name],
                         collectives={k: v for k, v in meter.snapshot().items() if v["calls"]}))
    return rows


def linear_section(args) -> list[dict]:
    rows = []
    for world_size in args.world_sizes:
        for seq_len in args.seq_lens:
            if seq_len % world_size:
                raise ValueError(f"--seq-lens: {seq_len} does not split over {world_size} ranks")
            print(f"linear  P={world_size}  N={seq_len}", flush=True)
            rows += run_ranks(_time_linear, world_size, seq_len, args.steps, timeout=3600)[0]
    return rows


SECTIONS = {"linear": linear_section}


def _markdown(rows, meta) -> str:
    lines = [f"# Sequence parallel benchmark ({meta['device']})", "",
             f"{meta['shapes']}; {meta['timing']}.", "",
             "| section | P | tokens | schedule | bytes/rank/step | time/step (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['section']} | {r['world_size']} | {r['seq_len']} | {r['schedule']} | "
                     f"{r['bytes_per_step']:,} | {r['step_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--seq-lens", type=ints, default=[16384, 65536, 262144],
                        help="comma list; the committed results add 1048576 (about 8 minutes on 2 cores)")
    parser.add_argument("--world-sizes", type=ints, default=[2, 4])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--sections", default="linear", help=f"comma list of {sorted(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="cpu", help="file suffix: sequence_parallel-<tag>.json/.md")
    args = parser.parse_args(argv)

    rows = [row for name in args.sections.split(",") for row in SECTIONS[name](args)]
    meta = dict(device=f"{platform.machine()} CPU, gloo, {torch.get_num_threads()} threads in parent, "
                       "1 thread per rank",
                shapes=f"B={B}, H={H}, Dk=Dv={D}, fp32, no decay, kernel chunk {CHUNK}",
                timing=f"fwd+bwd, max over ranks, median of {args.steps} steps after 1 warm-up",
                torch=torch.__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sequence_parallel-{args.tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (args.out / f"sequence_parallel-{args.tag}.md").write_text(_markdown(rows, meta))
    print(_markdown(rows, meta))


if __name__ == "__main__":
    main()
