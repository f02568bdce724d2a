"""Peak memory of the loss: full fp32 logits (ltrain.loss.lm_loss) against the chunked loss
(ltrain.loss.chunked_lm_loss), at the small model (conf/model/small.yaml) and 8K tokens.

    python -m benchmarks.loss_memory                          # CPU: both parts, 8192 tokens
    python -m benchmarks.loss_memory --parts loss --seq-len 32768

Parts, each with loss = full (logits [1, N, V], then F.cross_entropy) or chunked
(trainer.loss_chunk tokens of logits at a time), batch 1:
  loss  the head and the loss alone: x [1, N, dim] (a leaf, standing for the final norm's
        output) times the tied embedding W [V, dim], the loss, and its backward
  step  forward + backward of the whole model (dense attention, fp32), as the loop runs it

Every (part, loss) pair runs in a fresh process, so its peak is its own. CPU: the peak
above baseline is ru_maxrss at the end minus the resident set just before the measured
region (model and inputs built; the JSON keeps ru_maxrss before it too, which must be
below the peak for the difference to be the region's). CUDA: the same from
torch.cuda.max_memory_allocated. Writes benchmarks/results/loss_memory-<cpu|cuda>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.provenance, run as a file

from benchmarks.provenance import finish, markdown_line, provenance  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MIB = 2**20


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(part: str, loss_kind: str, model: str, seq_len: int, chunk: int, device: str) -> dict:
    """One (part, loss) in this process -> peak above baseline, seconds, the loss value."""
    import torch
    import yaml

    from ltrain.config import ModelConfig, TrainConfig
    from ltrain.loss import chunked_lm_loss, lm_loss
    from ltrain.models.transformer import Transformer

    cfg = TrainConfig(model=ModelConfig(**yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text())))
    cfg.attention.pattern = "D"
    m = cfg.model
    torch.manual_seed(0)
    labels = torch.randint(0, m.vocab_size, (1, seq_len), device=device)
    if part == "loss":
        x = torch.randn(1, seq_len, m.dim, device=device, requires_grad=True)
        weight = (m.init_std * torch.randn(m.vocab_size, m.dim, device=device)).requires_grad_()
        if loss_kind == "full":
            def run():
                return lm_loss(x @ weight.t(), labels)[0]
        else:
            def run():
                return chunked_lm_loss(x, weight, labels, chunk=chunk)[0]
    else:
        net = Transformer(cfg.model, cfg.attention).to(device)
        ids = torch.randint(0, m.vocab_size, (1, seq_len), device=device)
        if loss_kind == "full":
            def run():
                return lm_loss(net(ids), labels)[0]
        else:
            def run():
                return net(ids, output=partial(chunked_lm_loss, labels=labels, chunk=chunk))[0]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resident_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    start = time.perf_counter()
    loss = run()
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return dict(part=part, loss=loss_kind, seconds=time.perf_counter() - start, loss_value=loss.item(),
                baseline_mib=baseline / MIB, maxrss_before_mib=maxrss_before / MIB, peak_mib=peak / MIB,
                peak_above_baseline_mib=(peak - baseline) / MIB)


def run_child(part: str, loss_kind: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.loss_memory", "--child", f"{part}:{loss_kind}", "--model", args.model,
           "--seq-len", str(args.seq_len), "--chunk", str(args.chunk), "--device", args.device]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{part}:{loss_kind} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    a = report["args"]
    logits_mib = a["seq_len"] * report["vocab_size"] * 4 / MIB
    lines = [f"# Loss peak memory: full logits vs chunked, model {a['model']}, {a['seq_len']} tokens, {a['device']}",
             "", markdown_line(report), "",
             f"Batch 1, fp32, chunk {a['chunk']} tokens; vocab {report['vocab_size']}, so one fp32 copy of the "
             f"whole sequence's logits is {logits_mib:,.0f} MiB. Each row is a fresh process; peak above baseline: "
             + ("torch.cuda.max_memory_allocated minus memory allocated before the measured forward."
                if a["device"] == "cuda" else
                "ru_maxrss at the end minus the resident set just before the measured forward + backward.")
             + " Seconds: wall time of that forward + backward (on a shared machine: see the load average).",
             "", "| part | loss | peak above baseline (MiB) | full / chunked | seconds | loss value |",
             "|---|---|---|---|---|---|"]
    by = {(r["part"], r["loss"]): r for r in report["rows"]}
    for r in report["rows"]:
        full = by.get((r["part"], "full")) if r["loss"] == "chunked" else None
        ratio = f"{full['peak_above_baseline_mib'] / r['peak_above_baseline_mib']:.1f}x" if full else ""
        lines.append(f"| {r['part']} | {r['loss']} | {r['peak_above_baseline_mib']:,.0f} | {ratio} | "
                     f"{r['seconds']:.1f} | {r['loss_value']:.6f} |")
    if a["device"] != "cuda":
        lines += ["", "GPU (CUDA allocator): not measured (no GPU); `python -m benchmarks.loss_memory --device cuda` "
                  "measures it."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="loss,step", type=lambda s: s.split(","), help="loss, step or both")
    parser.add_argument("--model", default="small", help="a conf/model/*.yaml name")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024, help="trainer.loss_chunk")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # part:loss, measured in this process
    args = parser.parse_args(argv)
    if args.child:
        part, loss_kind = args.child.split(":")
        print(json.dumps(measure(part, loss_kind, args.model, args.seq_len, args.chunk, args.device)))
        return {}
    prov = provenance(argv, __file__)
    rows = []
    for part in args.parts:
        for loss_kind in ("full", "chunked"):
            rows.append(run_child(part, loss_kind, args))
            print(json.dumps(rows[-1]), flush=True)
    import yaml

    vocab = yaml.safe_load((REPO / "conf" / "model" / f"{args.model}.yaml").read_text())["vocab_size"]
    report = {**finish(prov), "args": vars(args), "vocab_size": vocab, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"loss_memory-{args.device}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"loss_memory-{args.device}.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
