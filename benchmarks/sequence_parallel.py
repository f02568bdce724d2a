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

Section "softmax": causal softmax attention in a small stack (--attn-layers
blocks x + Wo(attn(Wqkv x)), B=1, H=8, D=64, fp32, dense causal BlockLayout,
block 64, zigzag shards), cp = 1, 2, 4: cp=1 is the single-rank baseline
("local", no collectives), cp > 1 runs ring_attention (zigzag) and
ulysses_attention (attn_fn: the same block-sparse kernel over the whole
sequence of H/cp heads). Two series: fixed total N (--attn-seq-lens; memory
per rank should fall to about 1/cp) and fixed per-rank n (--attn-per-rank,
N = n x cp: weak scaling). Per config, one untimed memory step, then
--steps-softmax timed steps; per rank:
    activation_bytes  distinct storages saved for backward during the forward
                      (saved_tensors_hooks pack hook, parameters excluded)
    peak_step_bytes   peak of the running sum of allocator alloc/free events
                      over one fwd+bwd step (torch.profiler profile_memory),
                      above what was live before it: activations + transients
    bytes_per_step    comm meter bytes, as for "linear"
and tokens/s = N / step time (max over ranks). --device cuda (one GPU per
rank, NCCL) is written for the Triton path but has not been run here.

Sections are entries of SECTIONS: a function (args) -> list of row dicts; the
JSON and Markdown writers take the rows (one Markdown part per section). Run
from the repo root:

    python -m benchmarks.sequence_parallel [--sections linear,softmax] [--merge]
        [--seq-lens 16384,262144] [--world-sizes 2,4]             # linear
        [--attn-seq-lens 4096] [--attn-per-rank 1024] [--cps 1,2,4]  # softmax

--merge keeps the existing JSON's rows of the sections not run, each section
with the provenance of the run that made it. The linear default (16K, 64K,
256K on 2 and 4 ranks) takes about 2 minutes on 2 shared cores; the committed
results are both sections of one run, --seq-lens 16384,65536,262144,1048576
--world-sizes 2,4 --steps 3 (linear 8-10 minutes, softmax 2-4 minutes on 2
shared cores; the CPU reference kernel needs ~3 minutes per fwd+bwd at N = 16K
on one thread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.provenance import finish, markdown_line, provenance
from ltrain.kernels import BlockLayout, block_sparse_attention
from ltrain.kernels.lightning import lightning_bwd, lightning_fwd
from ltrain.parallel import (CommMeter, comm, lasp2_linear_attention, ring_attention, shard_sequence,
                             ulysses_attention)
from tests.multiproc import run_ranks

B, H, D, CHUNK = 1, 2, 16, 64


def _ring_shift(tensor: torch.Tensor) -> torch.Tensor:
    """Send `tensor` to rank r+1, return what rank r-1 sent."""
    rank, P = dist.get_rank(), dist.get_world_size()
    received = torch.empty_like(tensor)
    reqs = [comm.isend(tensor, (rank + 1) % P), comm.irecv(received, (rank - 1) % P)]  # both posted, then waited
    for req in reqs:
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
        dq, dk, dv, _, _ = lightning_bwd(q, k, v, None, prefix, do, None, CHUNK)
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


# ---- section "softmax": causal softmax attention, ring vs Ulysses -----------------------------

SOFTMAX_SCHEDULES = ("ring", "ulysses")  # cp = 1 runs "local" (no collectives) as the baseline of both


class _AttnBlock(torch.nn.Module):
    """x + Wo(attn(q, k, v)) with q, k, v = Wqkv(x) split into H heads: so the activations
    saved for backward are real ones (the Linear inputs, q/k/v, the attention output and lse)."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.wqkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.wo = torch.nn.Linear(width, width, bias=False)

    def forward(self, x, attend):
        B, n, _ = x.shape
        q, k, v = self.wqkv(x).view(B, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = attend(q, k, v)  # [B, H, n, D]
        return x + self.wo(o.transpose(1, 2).reshape(B, n, -1))


class _SavedBytes:
    """saved_tensors_hooks that sum the bytes of the distinct storages autograd saves for
    backward (parameters excluded): the activation memory a step holds between fwd and bwd."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}

    def pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self.skip:
            self.storages[st.data_ptr()] = st.nbytes()
        return t

    def total(self) -> int:
        return sum(self.storages.values())


def _peak_of_running_sum(prof) -> int:
    """Peak over the profiled region of (bytes allocated - bytes freed) since its start,
    from the profiler's allocator events (CPU: every malloc/free of torch's allocator)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    peak = live = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _softmax_rank(rank, world_size, configs, shape, steps, device):
    """One process of a cp group: for each config (schedule, N), one measured step (memory:
    saved-tensor hook + allocation profile), then `steps` timed steps."""
    heads, head_dim, layers, block = shape
    group = None
    if device == "cuda":
        torch.cuda.set_device(rank)
        group = dist.new_group(backend="nccl")
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)  # the same weights on every rank
    model = torch.nn.ModuleList(_AttnBlock(heads, head_dim) for _ in range(layers)).to(dev)
    layouts = {}

    def causal(m):
        if m not in layouts:
            layouts[m] = BlockLayout.causal(m, m, device=dev)
        return layouts[m]

    def local(q, k, v, head_start=0):
        return block_sparse_attention(q, k, v, causal(q.shape[2] // block), block_size=block)

    attend = {
        "local": local,
        "ring": lambda q, k, v: ring_attention(q, k, v, layout_fn=causal, group=group, block_size=block),
        "ulysses": lambda q, k, v: ulysses_attention(q, k, v, attn_fn=local, group=group, mode="zigzag"),
    }

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    rows = []
    for schedule, seq_len in configs:
        g = torch.Generator().manual_seed(1)
        x_full, dy_full = (torch.randn(1, seq_len, heads * head_dim, generator=g) for _ in range(2))
        x, dy = (shard_sequence(t, rank, world_size, mode="zigzag").to(dev) for t in (x_full, dy_full))
        del x_full, dy_full
        meter, times, mem = CommMeter(), [], {}
        for step in range(steps + 1):
            model.zero_grad(set_to_none=True)
            leaf = x.clone().requires_grad_()
            saved = _SavedBytes(model.parameters())
            dist.barrier()
            meter.reset()
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            prof = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                    if step == 0 and device == "cpu" else contextlib.nullcontext())
            start = time.perf_counter()
            with prof, meter:
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                    y = leaf
                    for blk in model:
                        y = blk(y, attend[schedule])
                y.backward(dy)
                sync()
            elapsed = time.perf_counter() - start
            if step == 0:  # the memory step: untimed (the profiler slows it)
                peak = _peak_of_running_sum(prof) if device == "cpu" else torch.cuda.max_memory_allocated() - base
                mem = dict(activation_bytes=saved.total(), peak_step_bytes=peak)
                bytes_per_step = meter.total_bytes()
                collectives = {k: v for k, v in meter.snapshot().items() if v["calls"]}
            else:
                times.append(elapsed)
            del y, leaf
        stats = torch.tensor([times[-1] if times else 0.0, *(float(v) for v in mem.values()), float(bytes_per_step)],
                             dtype=torch.float64)
        step_s_all = torch.tensor(times, dtype=torch.float64)
        if device == "cuda":
            stats, step_s_all = stats.to(dev), step_s_all.to(dev)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(step_s_all, op=dist.ReduceOp.MAX, group=group)  # per step: the slowest rank
        step_s_all = step_s_all.tolist()
        step_s = statistics.median(step_s_all)
        rows.append(dict(section="softmax", schedule=schedule, world_size=world_size, seq_len=seq_len,
                         per_rank=seq_len // world_size, step_s=step_s, step_s_all=step_s_all,
                         tokens_per_s=seq_len / step_s, activation_bytes=int(stats[1]), peak_step_bytes=int(stats[2]),
                         bytes_per_step=int(stats[3]), collectives=collectives))
    return rows


def softmax_section(args) -> list[dict]:
    """Unique (cp, schedule, N) configs of the fixed-total and the weak-scaling series, one
    run_ranks per cp; each row is tagged with the series it belongs to."""
    fixed = {(cp, n) for cp in args.cps for n in args.attn_seq_lens}
    weak = {(cp, n * cp) for cp in args.cps for n in args.attn_per_rank}
    shape = (args.attn_heads, args.attn_head_dim, args.attn_layers, args.attn_block)
    rows = []
    for cp in sorted(args.cps):
        schedules = ["local"] if cp == 1 else list(args.attn_schedules)
        lens = sorted(n for c, n in fixed | weak if c == cp)
        for n in lens:
            if n % (2 * cp * args.attn_block):
                raise ValueError(f"softmax: N={n} does not split into 2 x cp={cp} chunks of whole {args.attn_block}-blocks")
        configs = [(s, n) for n in lens for s in schedules]
        print(f"softmax  cp={cp}  {configs}", flush=True)
        start = time.perf_counter()
        for row in run_ranks(_softmax_rank, cp, configs, shape, args.steps_softmax, args.device, timeout=7200)[0]:
            row["series"] = [name for name, pts in (("fixed_total", fixed), ("weak", weak))
                             if (cp, row["seq_len"]) in pts]
            rows.append(row)
        print(f"  {time.perf_counter() - start:.0f}s", flush=True)
    return rows


SECTIONS = {"linear": linear_section, "softmax": softmax_section}


def _section_meta(name, args) -> dict:
    if name == "linear":
        return dict(shapes=f"B={B}, H={H}, Dk=Dv={D}, fp32, no decay, kernel chunk {CHUNK}",
                    timing=f"fwd+bwd, max over ranks, median of {args.steps} steps after 1 warm-up",
                    command="python -m benchmarks.sequence_parallel --sections linear "
                            f"--seq-lens {','.join(map(str, args.seq_lens))} "
                            f"--world-sizes {','.join(map(str, args.world_sizes))} --steps {args.steps}")
    impl = "Triton kernel, NCCL" if args.device == "cuda" else "PyTorch reference kernel (flash CPU op), gloo"
    return dict(shapes=f"{args.attn_layers} x [x + Wo(attn(Wqkv x))], B=1, H={args.attn_heads}, "
                       f"D={args.attn_head_dim}, d_model={args.attn_heads * args.attn_head_dim}, fp32, dense causal "
                       f"BlockLayout, block {args.attn_block}, zigzag shards; {impl}",
                timing=f"fwd+bwd, max over ranks, median of {args.steps_softmax} timed steps after 1 "
                       "(untimed) memory step",
                command="python -m benchmarks.sequence_parallel --sections softmax "
                        f"--attn-seq-lens {','.join(map(str, args.attn_seq_lens))} "
                        f"--attn-per-rank {','.join(map(str, args.attn_per_rank))} "
                        f"--cps {','.join(map(str, args.cps))} --attn-heads {args.attn_heads} "
                        f"--attn-head-dim {args.attn_head_dim} --attn-layers {args.attn_layers} "
                        f"--steps-softmax {args.steps_softmax}" + (" --device cuda" if args.device == "cuda" else ""),
                wall_s=None)


def _made_by(meta, top) -> str:
    """This section's command alone, and the run that made its rows: the file's own run (the line at
    the top) or an older one kept by --merge."""
    wall = f" ({meta['wall_s']:.0f} s wall)" if meta.get("wall_s") else ""
    made = meta.get("provenance")
    if made and made["started_at"] == top["started_at"]:
        made = f"Made by the run above; load average {made['load_avg_1m_end']:.1f} at the end of this section."
    elif made:
        made = "Kept from an earlier run (--merge): " + markdown_line(made)
    else:
        made = "Kept from an earlier run (--merge) that recorded no provenance."
    return f"This section alone: `{meta['command']}`{wall}. {made}"


def _mib(nbytes) -> str:
    return f"{nbytes / 2**20:.2f}"


def _linear_markdown(rows, meta, top) -> list[str]:
    lines = ["## linear: linear attention, LASP-2 vs state ring vs K/V ring", "",
             f"{meta['shapes']}; {meta['timing']}.", "", _made_by(meta, top), "",
             "| P | tokens | schedule | bytes/rank/step | time/step (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['seq_len']} | {r['schedule']} | {r['bytes_per_step']:,} | "
                     f"{r['step_s']:.3f} |")
    step = {(r["world_size"], r["seq_len"], r["schedule"]): r["step_s"] for r in rows}
    for a, b in (("lasp2", "lasp1_ring"), ("lasp2", "ring_kv")):
        pairs = [(p, n) for p, n, s in step if s == a and (p, n, b) in step]
        if pairs:
            faster = [(p, n) for p, n in pairs if step[p, n, a] < step[p, n, b]]
            lines += ["", f"{a} faster than {b} in {len(faster)} of {len(pairs)} (P, tokens) rows"
                      + (": " + ", ".join(f"P={p} N={n}" for p, n in faster) if faster else "") + "."]
    return lines


def _softmax_markdown(rows, meta, top) -> list[str]:
    lines = ["## softmax: causal softmax attention, ring (zigzag) vs Ulysses", "",
             f"{meta['shapes']}; {meta['timing']}.", "",
             _made_by(meta, top), "",
             "Memory, per rank, max over ranks (MiB = 2^20 bytes):", "",
             "- **activation** = bytes of the distinct storages autograd saves for backward during the forward "
             "(a `torch.autograd.graph.saved_tensors_hooks` pack hook, deduplicated by storage, parameters "
             "excluded): layer inputs, q/k/v, the attention output and lse, the input of Wo. Not counted: "
             "layouts and ring plans kept on ctx (int32, N/64 x N/64 at most), the gradients.",
             "- **peak** = peak of the running sum of allocation and free events of torch's CPU allocator "
             "(`torch.profiler.profile(profile_memory=True)`) over one fwd+bwd step, above what was live "
             "before it: activations plus every transient (kernel working set, ring double buffers, "
             "all-to-all buffers, gradients). On CUDA: `max_memory_allocated()` above the step's start.",
             "- **act / (cp=1 / cp)** = activation memory over an even split of cp=1's (fixed total N only); "
             "the target is <= 1.3 at cp=4.", "",
             "Bytes: the comm meter's buffer bytes per rank per step (all kinds summed, max over ranks; "
             "see parallel/comm.py); weight-gradient all-reduce over the cp group is not part of the step "
             "(the same for every schedule).", ""]
    base = {r["seq_len"]: r for r in rows if r["world_size"] == 1}
    for series, title in (("fixed_total", "Fixed total sequence length (strong scaling)"),
                          ("weak", "Fixed per-rank length (weak scaling)")):
        sel = sorted((r for r in rows if series in r.get("series", [])),
                     key=lambda r: (r["seq_len"] if series == "fixed_total" else r["per_rank"], r["world_size"],
                                    r["schedule"]))
        if not sel:
            continue
        lines += [f"### {title}", "",
                  "| N | cp | n/rank | schedule | tokens/s | time/step (s) | activation MiB | act / (cp=1 / cp) "
                  "| peak MiB | peak / (cp=1 / cp) | bytes/rank/step | collectives |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            b = base.get(r["seq_len"]) if series == "fixed_total" else None
            act_ratio = f"{r['activation_bytes'] / (b['activation_bytes'] / r['world_size']):.3f}" if b else "-"
            peak_ratio = f"{r['peak_step_bytes'] / (b['peak_step_bytes'] / r['world_size']):.3f}" if b else "-"
            coll = ", ".join(f"{k} {v['calls']}x" for k, v in r["collectives"].items()) or "none"
            lines.append(f"| {r['seq_len']} | {r['world_size']} | {r['per_rank']} | {r['schedule']} | "
                         f"{r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {_mib(r['activation_bytes'])} | {act_ratio} | "
                         f"{_mib(r['peak_step_bytes'])} | {peak_ratio} | {r['bytes_per_step']:,} | {coll} |")
        lines.append("")
        if series == "fixed_total":
            ratios = [(r, r["peak_step_bytes"] / (base[r["seq_len"]]["peak_step_bytes"] / r["world_size"]))
                      for r in sel if r["world_size"] > 1 and r["seq_len"] in base]
            if ratios:
                lines += ["Peak memory per rank over 1/cp of cp=1's (target <= 1.3): " + "; ".join(
                    f"N={r['seq_len']} cp={r['world_size']} {r['schedule']} {x:.2f} ({'met' if x <= 1.3 else 'missed'})"
                    for r, x in ratios) + ". Activation memory splits exactly (1.00) by construction: each rank "
                    "saves its own n/rank tokens' tensors.", ""]
    return lines


def _markdown(result) -> str:
    rows, meta = result["rows"], result["meta"]
    lines = [f"# Sequence parallel benchmark ({meta['device']})", "", markdown_line(result), "",
             "On a shared machine times are noisy; memory and bytes are not.", ""]
    if meta["gpu_note"]:
        lines += [meta["gpu_note"], ""]
    writers = {"linear": _linear_markdown, "softmax": _softmax_markdown}
    for name, writer in writers.items():
        sel = [r for r in rows if r["section"] == name]
        if sel:
            lines += writer(sel, meta["sections"][name], result) + [""]
    return "\n".join(lines).rstrip() + "\n"


GPU_NOTE = ("GPU (Triton kernel, NCCL) numbers were not measured: no GPU was available. On a node with at least "
            "4 GPUs they would come from `python -m benchmarks.sequence_parallel --sections softmax --device cuda "
            "--tag cuda --attn-seq-lens 16384,65536 --attn-per-rank 16384` (one rank per GPU; memory from "
            "`torch.cuda.max_memory_allocated`).")


def _old_meta(old: dict) -> dict:
    """Results written before per-section meta: their shapes/timing are the linear section's."""
    meta = dict(old["meta"])
    if "sections" not in meta:
        meta["sections"] = {"linear": dict(shapes=meta.pop("shapes"), timing=meta.pop("timing"),
                                           command="python -m benchmarks.sequence_parallel --sections linear "
                                                   "--seq-lens 16384,65536,262144,1048576 --world-sizes 2,4 --steps 3")}
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--sections", default="linear,softmax", help=f"comma list of {sorted(SECTIONS)}")
    parser.add_argument("--seq-lens", type=ints, default=[16384, 65536, 262144],
                        help="linear: comma list; the committed results add 1048576 (8-10 minutes on 2 cores)")
    parser.add_argument("--world-sizes", type=ints, default=[2, 4], help="linear: ranks")
    parser.add_argument("--steps", type=int, default=2, help="linear: timed steps after one warm-up step")
    parser.add_argument("--cps", type=ints, default=[1, 2, 4], help="softmax: cp degrees (1: single-rank baseline)")
    parser.add_argument("--attn-seq-lens", type=ints, default=[4096],
                        help="softmax: total N of the fixed-total series (the same N at every cp)")
    parser.add_argument("--attn-per-rank", type=ints, default=[1024],
                        help="softmax: per-rank n of the weak-scaling series (N = n x cp)")
    parser.add_argument("--attn-schedules", default="ring,ulysses", type=lambda s: s.split(","))
    parser.add_argument("--attn-heads", type=int, default=8)
    parser.add_argument("--attn-head-dim", type=int, default=64)
    parser.add_argument("--attn-layers", type=int, default=1)
    parser.add_argument("--attn-block", type=int, default=64)
    parser.add_argument("--steps-softmax", type=int, default=1, help="softmax: timed steps after the memory step")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="softmax: cuda puts rank r on GPU r and runs its collectives on NCCL")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of sections not run from the existing JSON of this tag")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="cpu", help="file suffix: sequence_parallel-<tag>.json/.md")
    args = parser.parse_args(argv)
    names = args.sections.split(",")
    if args.device == "cuda" and names != ["softmax"]:
        parser.error("--device cuda is implemented for --sections softmax only")
    unknown = [s for s in args.attn_schedules if s not in SOFTMAX_SCHEDULES]
    if unknown:
        parser.error(f"--attn-schedules: unknown {unknown}; allowed {SOFTMAX_SCHEDULES}")

    prov = provenance(argv, __file__)
    rows, sections = [], {}
    for name in names:
        start = time.perf_counter()
        rows += SECTIONS[name](args)
        sections[name] = _section_meta(name, args)
        sections[name]["wall_s"] = time.perf_counter() - start
        sections[name]["provenance"] = finish(dict(prov))  # the rows' own run: --merge keeps it with them
    json_path = args.out / f"sequence_parallel-{args.tag}.json"
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        old_sections = _old_meta(old)["sections"]
        rows = [r for r in old["rows"] if r["section"] not in names] + rows
        sections = {**{k: v for k, v in old_sections.items() if k not in names}, **sections}
    order = list(SECTIONS)
    rows.sort(key=lambda r: order.index(r["section"]))  # stable: each section keeps its own order
    meta = dict(device=f"CPU, gloo, {torch.get_num_threads()} threads in parent, "
                       "1 thread per rank" if args.device == "cpu" else "CUDA, NCCL, one GPU per rank",
                gpu_note=GPU_NOTE if args.device == "cpu" else "",
                sections={k: sections[k] for k in order if k in sections})
    result = dict(**finish(prov), meta=meta, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"sequence_parallel-{args.tag}.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
