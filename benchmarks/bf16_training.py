"""bf16 training of the mixed model (S2, InfLLM-V2, lightning, dense: conf/attention/mixed.yaml)
against fp32, and under context parallelism against one rank.

Each run is a fresh `ltrain-train` process (torchrun --nproc_per_node=2 for cp=2, gloo on CPU)
with the same seed, initial weights and synthetic batches; trainer.precision=bf16 is DeepSpeed's
bf16 mode (bf16 weights and activations, fp32 master weights and AdamW state, fp32 loss). The
per-step losses (the global token mean every step, trainer.log_every=1) come from each run's
metrics.jsonl and are compared step by step:

    each run vs fp32 cp=1             what bf16 (and the cp split) changes
    bf16 cp=2 vs bf16 cp=1            what the cp split changes at bf16

as mean and max |loss difference| over the steps, and the final-loss difference.

    python -m benchmarks.bf16_training [--steps 50] [--runs fp32-cp1,bf16-cp1,bf16-cp2,fp32-cp2]

Writes benchmarks/results/bf16_training-<tag>.json and .md (benchmarks/provenance.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.provenance, run as a file

from benchmarks.provenance import finish, markdown_line, provenance, write_results  # noqa: E402

VENV = REPO / ".venv" / "bin"
RUNS = ("fp32-cp1", "bf16-cp1", "bf16-cp2", "fp32-cp2")
# The README's default model (tiny, SILD, seq_len 256: InfLLM-V2 and S2 sparse) at dim 64 and 2 rows
# per step, so that CPU bf16 (no bf16 units: several times slower than fp32) fits 50 steps in minutes.
OVERRIDES = ("model.dim=64", "data.micro_batch_size=2", "trainer.log_every=1", "trainer.ckpt_every=0", "trainer.progress=false")
PAIRS = (("bf16-cp1", "fp32-cp1"), ("bf16-cp2", "fp32-cp1"), ("fp32-cp2", "fp32-cp1"), ("bf16-cp2", "bf16-cp1"))


def command(name: str, steps: int, out: Path, extra=()) -> list[str]:
    precision, cp = name.split("-cp")
    launcher = ([str(VENV / "torchrun"), "--standalone", f"--nproc_per_node={cp}", "-m", "ltrain.train"]
                if int(cp) > 1 else [sys.executable, "-m", "ltrain.train"])
    return [*launcher, f"trainer.precision={precision}", f"parallel.cp={cp}", f"trainer.max_steps={steps}",
            *OVERRIDES, *extra, f"trainer.out_dir={out}"]


def run(name: str, steps: int, out: Path, extra=()) -> dict:
    """One training run -> {run, command, wall_s, losses (per step)}."""
    cmd = command(name, steps, out, extra)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "LTRAIN_RUN_ID": name, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), f"{name}: steps {[r['step'] for r in rows]}"
    shown = " ".join(c.replace(str(VENV) + "/", ".venv/bin/").replace(sys.executable, "python")
                     for c in cmd if not c.startswith("trainer.out_dir="))
    return dict(run=name, command=shown, wall_s=round(wall, 1), losses=[r["loss"] for r in rows])


FIRST = 5  # steps of the default suite's bf16 cp=2 vs cp=1 check (tests/ltrain/test_train.py)


def compare(a: list[float], b: list[float]) -> dict:
    """Step-by-step |a - b|: mean, max (and its step), at the last step, and max over the first FIRST steps."""
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return dict(mean_abs=sum(diffs) / len(diffs), max_abs=diffs[worst], max_step=worst + 1, final_abs=diffs[-1],
                max_abs_first=max(diffs[:FIRST]))


def comparisons(runs: dict) -> list[dict]:
    return [dict(run=a, reference=b, **compare(runs[a]["losses"], runs[b]["losses"]))
            for a, b in PAIRS if a in runs and b in runs]


def markdown(report: dict) -> str:
    steps = report["steps"]
    lines = [f"# bf16 training of the mixed model vs fp32, cp=2 vs cp=1 ({steps} steps)", "",
             markdown_line(report), "",
             "Tiny model (conf/model/tiny.yaml at dim 64), layers S2, InfLLM-V2, lightning, dense (conf/attention/mixed.yaml), "
             "synthetic passkey rows of 256 tokens, 2 rows per step, same seed and data in every run; bf16 is "
             "DeepSpeed's bf16 mode with fp32 master weights. Loss: the global token mean at each step.", "",
             "| run | command | wall s | loss step 1 | loss last step |", "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | `{r['command']}` | {r['wall_s']:.0f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |"
              for r in report["runs"]]
    lines += ["", f"| run | vs | mean abs loss diff | max abs loss diff (step) | abs diff at the last step | "
              f"max abs diff, steps 1-{FIRST} |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['run']} | {c['reference']} | {c['mean_abs']:.2e} | {c['max_abs']:.2e} ({c['max_step']}) | "
              f"{c['final_abs']:.2e} | {c['max_abs_first']:.2e} |" for c in report["comparisons"]]
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main(argv=None, write: bool = True) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", default=",".join(RUNS), type=lambda s: s.split(","))
    parser.add_argument("--tag", default="cpu", help="results file suffix")
    args = parser.parse_args(argv)
    prov = provenance(argv, __file__)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            runs[name] = run(name, args.steps, Path(tmp))
            print(json.dumps({k: v for k, v in runs[name].items() if k != "losses"}), flush=True)
    report = dict(**finish(prov), steps=args.steps, runs=list(runs.values()), comparisons=comparisons(runs))
    if write:
        write_results(f"bf16_training-{args.tag}", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
