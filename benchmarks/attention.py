"""Attention benchmark: dense causal SDPA vs S2 block-sparse attention.

For each method and sequence length: forward and forward+backward wall time,
peak memory, and TFLOP/s counted on the active blocks (4 * block_size^2 * D
per active (query block, key block) pair and head in the forward; the
backward counts 2.5x that, FlashAttention's convention).

    python benchmarks/attention.py                       # CPU: 4K, 8K, 16K
    python benchmarks/attention.py --seq-lens 4096 65536 --methods s2

CPU runs the PyTorch reference (impl="torch"), fp32; CUDA runs the Triton
kernel, bf16, and names the GPU. Each (method, length) runs in its own
subprocess so peak memory is honest: on CPU it is the rise of the process's
resident-set high-water mark (getrusage ru_maxrss) over its resident size
just before the timed calls, i.e. everything the op allocates (inputs
excluded, outputs and autograd state included); on CUDA it is
torch.cuda.max_memory_allocated over the same window.

A method is a builder in METHODS: (q, k, v, args) -> (fn, active_blocks); an
InfLLM-V2 entry is one more builder.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.provenance, run as a file

from benchmarks.provenance import finish, markdown_line, provenance  # noqa: E402
from ltrain.kernels import block_sparse_attention, s2_layout  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def dense(q, k, v, args):
    m = q.shape[2] // args.block_size
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return fn, q.shape[1] * m * (m + 1) // 2


def s2(q, k, v, args):
    layout = s2_layout(q.shape[1], q.shape[2], block_size=args.block_size, device=q.device)
    impl = "triton" if q.is_cuda else "torch"
    fn = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=args.block_size, impl=impl)
    return fn, int(layout.counts.sum())


METHODS = {"dense": dense, "s2": s2}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakMemory:
    """Peak bytes allocated inside the `with` block, above what was live at entry."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = _rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start


def _time(step, device, repeats) -> float:
    step()  # warm-up (Triton compile, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    shape_q = (args.batch, args.heads, args.seq_len, args.head_dim)
    shape_kv = (args.batch, args.kv_heads, args.seq_len, args.head_dim)
    q = torch.randn(shape_q, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(shape_q, device=device, dtype=dtype)
    fn, active_blocks = METHODS[args.method](q, k, v, args)

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    # Forward first: ru_maxrss is a high-water mark, so the forward's peak is
    # read before the backward raises it.
    with PeakMemory(device) as mem_fwd:
        t_fwd = _time(fwd, device, args.repeats)
    with PeakMemory(device) as mem_fb:
        t_fb = _time(fwd_bwd, device, args.repeats)
    flops_fwd = 4 * args.batch * active_blocks * args.block_size**2 * args.head_dim
    return dict(
        method=args.method, seq_len=args.seq_len, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, block_size=args.block_size, dtype=str(dtype).removeprefix("torch."),
        density=active_blocks / (args.heads * (args.seq_len // args.block_size) ** 2),
        fwd_ms=1e3 * t_fwd, fwd_bwd_ms=1e3 * t_fb,
        fwd_peak_mib=mem_fwd.peak / 2**20, fwd_bwd_peak_mib=max(mem_fwd.peak, mem_fb.peak) / 2**20,
        fwd_tflops=flops_fwd / t_fwd / 1e12, fwd_bwd_tflops=3.5 * flops_fwd / t_fb / 1e12,
    )


def markdown(report: dict) -> str:
    rows = report["results"]
    dense_ms = {(r["seq_len"]): r["fwd_bwd_ms"] for r in rows if r["method"] == "dense"}
    lines = [
        f"# Attention benchmark ({report['device']})",
        "",
        markdown_line(report),
        "",
        f"{report['torch_threads']} torch threads; B={rows[0]['batch']}, H={rows[0]['heads']}, "
        f"Hkv={rows[0]['kv_heads']}, D={rows[0]['head_dim']}, block_size={rows[0]['block_size']}, {rows[0]['dtype']}. "
        "Peak memory: " + report["memory"] + ". TFLOP/s on active blocks.",
        "",
        "| method | seq_len | density | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs dense | fwd peak MiB | fwd+bwd peak MiB | fwd TFLOP/s | fwd+bwd TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = dense_ms.get(r["seq_len"])
        speedup = f"{speedup / r['fwd_bwd_ms']:.2f}x" if speedup else "-"
        lines.append(
            f"| {r['method']} | {r['seq_len']} | {r['density']:.3f} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
            f"{speedup} | {r['fwd_peak_mib']:.0f} | {r['fwd_bwd_peak_mib']:.0f} | {r['fwd_tflops']:.3f} | "
            f"{r['fwd_bwd_tflops']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072] if gpu else [4096, 8192, 16384])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16 if gpu else 8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3 if gpu else 1)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    prov = provenance(argv, __file__)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    common = ["--batch", args.batch, "--heads", args.heads, "--kv-heads", args.kv_heads, "--head-dim",
              args.head_dim, "--block-size", args.block_size, "--repeats", args.repeats]
    results = []
    for seq_len in args.seq_lens:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--worker", "--method", method, "--seq-len", seq_len, *common]
            out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
            if out.returncode:
                print(f"{method} @ {seq_len}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{method:>6} N={seq_len:>6}: fwd {r['fwd_ms']:9.1f} ms  fwd+bwd {r['fwd_bwd_ms']:9.1f} ms  "
                  f"peak {r['fwd_bwd_peak_mib']:7.0f} MiB  {r['fwd_bwd_tflops']:.3f} TFLOP/s", flush=True)
    memory = ("torch.cuda.max_memory_allocated above the live inputs" if device == "gpu" else
              "rise of ru_maxrss over the resident size before the timed calls, one subprocess per row")
    report = dict(**finish(prov), device=device, torch_threads=torch.get_num_threads(), memory=memory,
                  results=results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"attention-{device}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / f"attention-{device}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
