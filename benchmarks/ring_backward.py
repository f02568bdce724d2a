"""Ring attention's backward time on real gloo ranks (CPU, the PyTorch reference kernel).

    python -m benchmarks.ring_backward --label before    # on the code to compare against
    python -m benchmarks.ring_backward --label after     # after the change; adds to the same files

One call of parallel.ring.ring_attention per step on a zigzag shard, B=1,
Hq=8, Hkv=2 (GQA), D=64, fp32, block 64, for two layouts over the whole
sequence: "dense" (BlockLayout.causal) and "s2" (kernels.s2.s2_layout,
local_blocks=16, vert_stride=8: the paper's). Per step: the forward, a
barrier, then the timed backward (o.backward(do)) until every rank is done;
reported: the max over ranks of one backward's wall time and of its
process CPU time, medians over --steps timed steps after one untimed
warm-up step (the forward's wall time likewise, for scale).

Each --label is one run with its own provenance (and --note: what code it
measured), kept under "runs" in benchmarks/results/ring_backward-<tag>.{json,md}
(a rerun of a label replaces it); the Markdown compares the last run with
--baseline (default: the first label). Each rank runs one torch thread
(tests/multiproc.run_ranks): 4 ranks on a 2-core machine share the cores,
and wall times follow whatever else the machine runs; CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.provenance, run as a file

from benchmarks.provenance import finish, markdown_line, provenance  # noqa: E402
from ltrain.kernels import BlockLayout, s2_layout  # noqa: E402
from ltrain.parallel import ring_attention, shard_sequence  # noqa: E402
from tests.multiproc import run_ranks  # noqa: E402

RESULTS = Path(__file__).parent / "results"
B, HQ, HKV, D, BS = 1, 8, 2, 64, 64
LAYOUTS = {
    "dense": lambda m: BlockLayout.causal(m, m),
    "s2": lambda m: s2_layout(HQ, m * BS, block_size=BS, local_blocks=16, vert_stride=8),
}


def _time_ring(rank, world_size, seq_len, layout_name, steps):
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(B, HQ, seq_len, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, HKV, seq_len, D, generator=g) for _ in range(2))
    q, k, v, do = (shard_sequence(t, rank, world_size, dim=2) for t in (q, k, v, do))
    layout = LAYOUTS[layout_name](seq_len // BS)  # built once: the layer caches it too
    fwd, bwd, bwd_cpu = [], [], []
    for step in range(steps + 1):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        dist.barrier()
        start = time.perf_counter()
        o = ring_attention(*leaves, layout_fn=lambda m: layout, group=None, block_size=BS)
        mid = time.perf_counter()
        dist.barrier()
        resumed, resumed_cpu = time.perf_counter(), time.process_time()
        o.backward(do)
        times = torch.tensor([mid - start, time.perf_counter() - resumed, time.process_time() - resumed_cpu],
                             dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        if step > 0:
            fwd.append(times[0].item())
            bwd.append(times[1].item())
            bwd_cpu.append(times[2].item())
    return dict(layout=layout_name, cp=world_size, seq_len=seq_len, forward_s=statistics.median(fwd),
                backward_s=statistics.median(bwd), backward_s_all=bwd,
                backward_cpu_s=statistics.median(bwd_cpu), backward_cpu_s_all=bwd_cpu)


def _key(row: dict) -> tuple:
    return row["layout"], row["cp"], row["seq_len"]


def markdown(report: dict) -> str:
    runs = report["runs"]
    labels = list(runs)
    by_label = {label: {_key(r): r for r in runs[label]["rows"]} for label in labels}
    first, last = report.get("baseline") or labels[0], labels[-1]
    lines = [f"# Ring attention backward, B{B} Hq{HQ} Hkv{HKV} D{D} block {BS}, fp32, zigzag, "
             "CPU PyTorch reference, gloo", ""]
    lines += [f"- {label}: " + (f"{runs[label]['note']}. " if runs[label].get("note") else "")
              + markdown_line(runs[label]) for label in labels]
    lines += ["", "One backward: wall time and process CPU time (the rank's own work, less exposed to other "
              "jobs on a shared machine), max over ranks, median over the timed steps; the forward of the "
              "last run for scale." + (f" Ratio: {first} / {last}." if first != last else ""), ""]
    head = ["layout", "cp", "tokens", f"{last} fwd (s)"]
    for label in labels:
        head += [f"{label} bwd (s)", f"{label} bwd CPU (s)"]
    if first != last:
        head += ["ratio bwd", "ratio bwd CPU"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(row, name, fmt="{:.3f}"):
        return fmt.format(row[name]) if row and name in row else "-"

    for key, row in by_label[last].items():
        cells = [key[0], str(key[1]), str(key[2]), cell(row, "forward_s")]
        for label in labels:
            cells += [cell(by_label[label].get(key), "backward_s"), cell(by_label[label].get(key), "backward_cpu_s")]
        if first != last:
            base = by_label[first].get(key)
            for name in ("backward_s", "backward_cpu_s"):
                cells.append(f"{base[name] / row[name]:.2f}" if base and name in base else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "GPU (Triton kernels over NCCL): not measured (no GPU; this script runs the CPU reference over "
              "gloo). The step it would time is the same ring_attention call on CUDA tensors, one GPU per rank."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this run, e.g. before / after a change")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--note", default="", help="what code this run measured, for the results")
    parser.add_argument("--baseline", default=None, help="label the Markdown compares the last run with "
                        "(default: the first label in the results)")
    parser.add_argument("--tag", default="cpu", help="results file suffix")
    args = parser.parse_args(argv)
    prov = provenance(argv, __file__)
    path = RESULTS / f"ring_backward-{args.tag}.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    if args.baseline not in (None, args.label, *runs):
        parser.error(f"--baseline {args.baseline!r}: no such run in {path} (runs: {', '.join(runs) or 'none'})")
    rows = []
    for world_size in args.world_sizes:
        for seq_len in args.seq_lens:
            for name in args.layouts:
                row = run_ranks(_time_ring, world_size, seq_len, name, args.steps, timeout=3600)[0]
                print(f"{name} cp={world_size} N={seq_len}: forward {row['forward_s']:.3f} s, "
                      f"backward {row['backward_s']:.3f} s", flush=True)
                rows.append(row)
    prov = finish(prov)
    runs[args.label] = {**prov, "note": args.note, "threads_per_rank": 1, "steps": args.steps, "rows": rows}
    # Top level: the provenance of the run that wrote the file last.
    report = {**prov, "baseline": args.baseline, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
