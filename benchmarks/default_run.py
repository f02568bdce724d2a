"""Time the README's runs as a newcomer runs them: `ltrain-train` with no
arguments (the tiny mixed model) and the torchrun cp=2 line after it.

Each run is a fresh process (start-up, Hydra, DeepSpeed engine and the
training loop all counted); the wall time, the first and last logged loss,
tokens/s over the run and the per-layer summary come from the run's own
metrics.jsonl and its end-of-run summary.

    python -m benchmarks.default_run [--runs default,cp2]

Writes benchmarks/results/default_run-cpu.json and .md with the command, the
git commit, the machine and the load average before and after each run.
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

from benchmarks.provenance import finish, load_avg_1m, markdown_line, provenance  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
VENV = REPO / ".venv" / "bin"
RUNS = {
    "default": [str(VENV / "ltrain-train")],
    "cp2": [str(VENV / "torchrun"), "--nproc_per_node=2", "-m", "ltrain.train", "parallel.cp=2"],
}


def run(name: str, out: Path) -> dict:
    cmd = [*RUNS[name], f"trainer.out_dir={out}", "trainer.progress=false"]
    load_before = load_avg_1m()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "LTRAIN_RUN_ID": name})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    log = proc.stdout + proc.stderr
    summary = log[log.index("done: "):].splitlines()
    return dict(run=name, command=" ".join(RUNS[name]).replace(str(VENV) + "/", ".venv/bin/"), wall_s=wall,
                steps=rows[-1]["step"], first_logged_loss=rows[0]["loss"], last_loss=rows[-1]["loss"],
                summary=[s.strip() for s in summary[:1 + 5]], load_avg_before=load_before,
                load_avg_after=load_avg_1m())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="default,cp2", type=lambda s: s.split(","))
    args = ap.parse_args(argv)
    result = dict(**provenance(argv, __file__), rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            result["rows"].append(run(name, Path(tmp)))
            print(json.dumps(result["rows"][-1]), flush=True)
    finish(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_run-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# The README's default runs", "", markdown_line(result), "", "Wall time includes start-up.", "",
             "| run | command | steps | wall s | loss (first logged -> last) | summary | 1-min load before/after |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | `{r['command']}` | {r['steps']} | {r['wall_s']:.0f} | {r['first_logged_loss']:.3f} -> "
              f"{r['last_loss']:.3f} | {'<br>'.join(r['summary'])} | {r['load_avg_before']:.1f} / "
              f"{r['load_avg_after']:.1f} |" for r in result["rows"]]
    (RESULTS / "default_run-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
