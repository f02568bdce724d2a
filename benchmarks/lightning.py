"""Lightning attention forward+backward: what a learned decay costs.

    python benchmarks/lightning.py                          # CPU: 4K, 16K, 64K tokens
    python benchmarks/lightning.py --seq-lens 65536 262144  # on a GPU: Triton, bf16

Shapes: batch 1, 8 heads, Dk = Dv = 64, chunk 64, TransNormerLLM decays of
the first layer. Needs only torch (and triton on a GPU). "fixed" is a constant decay (no decay gradient), "learned" a
decay that requires grad, which adds one forward-order pass carrying the
tangent dS/dlog(lambda) (Triton) or the adjoint terms (PyTorch reference).
Timed with torch.utils.benchmark (median of blocked runs; CUDA synchronised).
Results: benchmarks/results/lightning-<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.provenance, run as a file

from benchmarks.provenance import finish, markdown_line, provenance  # noqa: E402
from ltrain.kernels import lightning_attention  # noqa: E402

RESULTS = Path(__file__).parent / "results"
H, D, CHUNK = 8, 64, 64


def step_time(n: int, learned: bool, device: str, dtype: torch.dtype, min_run_time: float) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    do = torch.randn_like(v)
    # TransNormerLLM's lambda_h = exp(-8 h / H) on the first layer (ltrain.attention.linear.transnormer_decay).
    decay = torch.exp(-8 * torch.arange(1, H + 1, device=device) / H).requires_grad_(learned)

    def fwd_bwd():
        o = lightning_attention(q, k, v, decay=decay, chunk_size=CHUNK)
        grads = torch.autograd.grad(o, [q, k, v, decay] if learned else [q, k, v], do)
        assert len(grads) == 3 + learned

    fwd_bwd()  # warm-up (and Triton compile)
    timer = benchmark.Timer(stmt="fwd_bwd()", globals={"fwd_bwd": fwd_bwd})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def markdown(report: dict) -> str:
    lines = [f"# Lightning attention fwd+bwd, B1 H{H} D{D} chunk {CHUNK}, {report['dtype']}, {report['device']}", "",
             markdown_line(report), "",
             f"{report['threads']} torch threads; timed with torch.utils.benchmark (median of blocked runs, "
             f"{report['min_run_time_s']:g} s of timed runs per cell).", "", "| tokens | fixed decay (s) | learned decay (s) | learned / fixed |", "|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['seq_len']} | {r['fixed_s']:.4f} | {r['learned_s']:.4f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed runs per row")
    parser.add_argument("--tag", default=None, help="results file suffix (default: cpu or cuda)")
    args = parser.parse_args(argv)
    prov = provenance(argv, __file__)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for n in args.seq_lens:
        fixed = step_time(n, False, device, dtype, args.min_run_time)
        learned = step_time(n, True, device, dtype, args.min_run_time)
        rows.append({"seq_len": n, "fixed_s": fixed, "learned_s": learned, "ratio": learned / fixed})
        print(f"N={n}: fixed {fixed:.4f} s, learned {learned:.4f} s ({learned / fixed:.2f}x)", flush=True)
    impl = "Triton" if device == "cuda" else "PyTorch reference"
    report = {**finish(prov), "device": f"{device} ({impl})", "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "min_run_time_s": args.min_run_time, "rows": rows}
    tag = args.tag or device
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"lightning-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"lightning-{tag}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
