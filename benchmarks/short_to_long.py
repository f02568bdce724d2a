"""Short-to-long: dense pretraining at a short length, then the same weights past
InfLLM-V2's dense_len in sparse mode, against the same continuation kept dense.

    python benchmarks/short_to_long.py                          # CPU: 300 + 150 steps, ~5 min on 2 cores
    python benchmarks/short_to_long.py --pretrain-steps 20 --continue-steps 5 --probes 8   # smoke

Three `ltrain-train` runs, as subprocesses, under --out-dir (default outputs/short_to_long):

  pretrain  experiment=short-to-long-dense: tiny model, every layer dense, passkey data at
            seq_len 128 (= attention.infllm_v2.dense_len of conf/attention/infllm_v2.yaml), N steps
  sparse    experiment=short-to-long-sparse trainer.resume=<pretrain's final checkpoint>:
            seq_len 512, every layer infllm_v2 (top-k block-sparse past dense_len), M more steps
  dense     the same with attention=dense (the control)

Both continuations restore the same weights, optimizer, LR schedule and data position, so
their first step sees the same batch with the same weights: its loss (computed before the
update) is the loss just after the switch. Then, in this process, from each final
checkpoint's weights (ltrain.eval.load_model: the model of the run's config.yaml, its layers
rebuilt as dense or infllm_v2): held-out loss on fixed sequences (ltrain.eval.heldout_loss,
data seed --eval-seed, not the training stream) and greedy passkey-retrieval accuracy at 512
(ltrain.eval.passkey_by_depth, --probes probes at each of --depths). Writes
benchmarks/results/short_to_long-<tag>.{json,md} with benchmarks.provenance's keys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.provenance, run as a file

from benchmarks.provenance import finish, markdown_line, provenance  # noqa: E402
from ltrain.eval import eval_batches, heldout_loss, load_model, passkey_by_depth  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
SPARSE_PRESET = dict(OmegaConf.load(REPO / "conf/attention/infllm_v2.yaml").infllm_v2)


def train_cmd(out_dir: Path, run: str, overrides: list[str], threads: int) -> tuple[list[str], dict]:
    env = {**os.environ, "LTRAIN_RUN_ID": run, "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "ltrain.train", f"trainer.out_dir={out_dir}", "trainer.progress=false", *overrides]
    return cmd, env


def start(out_dir: Path, run: str, overrides: list[str], threads: int) -> subprocess.Popen:
    shutil.rmtree(out_dir / run, ignore_errors=True)  # a stale run dir would be auto-resumed / appended to
    (out_dir / run).mkdir(parents=True)
    cmd, env = train_cmd(out_dir, run, overrides, threads)
    print("$", " ".join(f"LTRAIN_RUN_ID={run} OMP_NUM_THREADS={threads}".split() + cmd[1:]), flush=True)
    log = open(out_dir / f"{run}.stdout", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, out_dir: Path, run: str) -> None:
    if proc.wait() != 0:
        tail = (out_dir / f"{run}.stdout").read_text()[-3000:]
        raise SystemExit(f"{run} failed (exit {proc.returncode}):\n{tail}")


def metrics(out_dir: Path, run: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out_dir / run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def final_checkpoint(out_dir: Path, run: str) -> Path:
    ckpt_dir = out_dir / run / "checkpoints"
    return ckpt_dir / (ckpt_dir / "latest").read_text().strip()


def as_kind(kind: str) -> dict:
    """load_model overrides that rebuild every layer as `kind` (same parameters): "dense", or
    "infllm_v2" with the CPU preset of conf/attention/infllm_v2.yaml."""
    attention = {"pattern": {"dense": "D", "infllm_v2": "I"}[kind], "layers": None}
    if kind == "infllm_v2":
        attention["infllm_v2"] = SPARSE_PRESET
    return {"attention": attention}


def mean(xs):
    return sum(xs) / len(xs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--continue-steps", type=int, default=150)
    ap.add_argument("--short", type=int, default=128, help="pretraining seq_len (<= dense_len: dense)")
    ap.add_argument("--long", type=int, default=512, help="continuation seq_len (> dense_len: sparse)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--out-dir", type=Path, default=REPO / "outputs" / "short_to_long")
    ap.add_argument("--probes", type=int, default=50, help="passkey probes per depth")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--eval-seqs", type=int, default=32, help="held-out sequences per length")
    ap.add_argument("--eval-seed", type=int, default=4321)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    ap.add_argument("--sequential", action="store_true", help="run the two continuations one after the other")
    ap.add_argument("--skip-train", action="store_true", help="evaluate the runs already in --out-dir")
    ap.add_argument("--tag", default="cpu", help="results file suffix")
    args = ap.parse_args(argv)
    prov = provenance(argv, __file__)
    torch.set_num_threads(args.threads)
    out, n_pre, n_tot = args.out_dir.resolve(), args.pretrain_steps, args.pretrain_steps + args.continue_steps
    common = [f"data.micro_batch_size={args.micro_batch}"]
    if n_pre <= 10 or n_tot <= 10:
        common.append("optim.warmup_steps=2")

    t0 = time.perf_counter()
    walls = {}
    if not args.skip_train:
        t = time.perf_counter()
        wait(start(out, "pretrain", ["experiment=short-to-long-dense", "trainer.resume=none", *common,
                                     f"data.seq_len={args.short}", f"trainer.max_steps={n_pre}"], args.threads),
             out, "pretrain")
        walls["pretrain"] = time.perf_counter() - t
        ckpt = final_checkpoint(out, "pretrain")
        cont = ["experiment=short-to-long-sparse", f"trainer.resume={ckpt}", *common,
                f"data.seq_len={args.long}", f"trainer.max_steps={n_tot}"]
        t = time.perf_counter()
        procs = {}
        for run, extra in (("sparse", []), ("dense", ["attention=dense"])):
            procs[run] = start(out, run, cont + extra, args.threads)
            if args.sequential:
                wait(procs[run], out, run)
        for run, proc in procs.items():
            wait(proc, out, run)
        walls["continuations"] = time.perf_counter() - t

    pre, runs = metrics(out, "pretrain"), {r: metrics(out, r) for r in ("sparse", "dense")}
    first = n_pre + 1
    k = min(10, args.continue_steps)
    result = {
        **prov,
        "settings": {"threads_per_process": args.threads, "sequential": args.sequential,"pretrain_steps": n_pre, "continue_steps": args.continue_steps, "short_seq_len": args.short,
                     "long_seq_len": args.long, "micro_batch_size": args.micro_batch, "infllm_v2": SPARSE_PRESET,
                     "probes_per_depth": args.probes, "depths": args.depths, "eval_seqs": args.eval_seqs,
                     "eval_seed": args.eval_seed},
        "train_loss": {"before_switch": pre[n_pre]["loss"], "before_switch_seq_len": pre[n_pre]["seq_len"]},
        # The lr each step used: the first continued step runs on the restored schedule, the next
        # ones on the schedule re-evaluated for the new max_steps.
        "lr": {"end_of_pretrain": pre[n_pre]["lr"], "first_continued_step": runs["sparse"][first]["lr"],
               "second_continued_step": runs["sparse"].get(first + 1, {}).get("lr"),
               "end": runs["sparse"][n_tot]["lr"]},
        "wall_s": walls,
    }
    for run, m in runs.items():
        modes = sorted({v for key, v in m[first].items() if key.endswith("/mode")})
        result["train_loss"][run] = {
            "after_switch": m[first]["loss"],  # first continued step: pretrained weights, before its update
            f"mean_first_{min(5, args.continue_steps)}": mean([m[s]["loss"] for s in range(first, min(first + 5, n_tot + 1))]),
            "end": m[n_tot]["loss"],
            f"mean_last_{k}": mean([m[s]["loss"] for s in range(n_tot - k + 1, n_tot + 1)]),
            "first_step_modes": modes,
            "mean_step_time_s": mean([m[s]["step_time_s"] for s in range(first, n_tot + 1)]),
            "curve": {s: m[s]["loss"] for s in range(first, n_tot + 1) if (s - n_pre) % 10 == 0 or s <= first + 4},
        }
        block = [v for key, v in m[n_tot].items() if key.endswith("/block_fraction")]
        if block:
            result["train_loss"][run]["end_block_fraction"] = mean(block)

    # Held-out loss and passkey accuracy, from the checkpoints' weights.
    t = time.perf_counter()
    short_eval, long_eval = eval_batches(args.short, args.eval_seqs, args.eval_seed), eval_batches(args.long, args.eval_seqs, args.eval_seed)
    ckpts = {"pretrain": final_checkpoint(out, "pretrain"), "sparse": final_checkpoint(out, "sparse"),
             "dense": final_checkpoint(out, "dense")}
    evals = {}
    cases = [  # (name, run, attention kind at eval, seq_len)
        ("pretrain dense @short", "pretrain", "dense", "short"),
        ("pretrain dense @long", "pretrain", "dense", "long"),
        ("pretrain sparse @long", "pretrain", "infllm_v2", "long"),
        ("sparse-continued sparse @long", "sparse", "infllm_v2", "long"),
        ("sparse-continued dense @long", "sparse", "dense", "long"),
        ("dense-continued dense @long", "dense", "dense", "long"),
        ("dense-continued sparse @long", "dense", "infllm_v2", "long"),
    ]
    for name, run, kind, length in cases:
        model, _ = load_model(out / run, ckpts[run], as_kind(kind))
        seq_len = args.short if length == "short" else args.long
        loss, modes = heldout_loss(model, short_eval if length == "short" else long_eval)
        acc = passkey_by_depth(model, seq_len, args.probes, args.depths, seed=args.eval_seed)
        evals[name] = {"run": run, "attention": kind, "seq_len": seq_len, "heldout_loss": loss,
                       "modes": sorted(set(modes)) or ["dense"], "passkey": acc}
        print(f"{name:32s} loss {loss:.4f}  passkey {acc}  modes {sorted(set(modes)) or ['dense']}", flush=True)
    result["eval"] = evals
    walls["eval"] = time.perf_counter() - t
    walls["total"] = time.perf_counter() - t0
    finish(result)
    write(result, args.tag)


def write(r: dict, tag: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"short_to_long-{tag}.json").write_text(json.dumps(r, indent=1) + "\n")
    s, tl, ev = r["settings"], r["train_loss"], r["eval"]
    k5 = next(key for key in tl["sparse"] if key.startswith("mean_first_"))
    kl = next(key for key in tl["sparse"] if key.startswith("mean_last_"))
    fmt = lambda x: f"{x:.4f}" if isinstance(x, float) and math.isfinite(x) else str(x)  # noqa: E731
    acc = lambda name: f"{ev[name]['passkey']['mean']:.2f} (" + ", ".join(  # noqa: E731
        f"{d}: {v:.2f}" for d, v in ev[name]["passkey"].items() if d != "mean") + ")"
    lines = [
        f"# Short-to-long: dense at {s['short_seq_len']} -> InfLLM-V2 sparse at {s['long_seq_len']}",
        "",
        markdown_line(r),
        "",
        f"Tiny model (0.85M), synthetic passkey data, micro batch {s['micro_batch_size']}, "
        f"{s['threads_per_process']} torch thread(s) per training process. "
        f"Stage 1: {s['pretrain_steps']} steps dense at {s['short_seq_len']} tokens "
        f"(= dense_len). Stage 2: the final checkpoint resumed at {s['long_seq_len']} tokens for "
        f"{s['continue_steps']} more steps, every layer infllm_v2 ({s['infllm_v2']}) — sparse — or, "
        "as the control, dense. Same weights, optimizer state, LR schedule and data stream in both; "
        f"the LR (as each step used it) is {r['lr']['end_of_pretrain']:.2e} at the end of stage 1, "
        f"{r['lr']['first_continued_step']:.2e} at the first continued step (the restored schedule), "
        + (f"{r['lr']['second_continued_step']:.2e} at the second (the cosine schedule re-evaluated for "
           f"max_steps {s['pretrain_steps'] + s['continue_steps']}) and " if r["lr"].get("second_continued_step")
           else "then ")
        + f"{r['lr']['end']:.2e} at the end.",
        "",
        "Training loss (per-step batch mean; the first continued step's loss is computed with the "
        "pretrained weights, before its update, on the same batch in both runs):",
        "",
        f"| continuation at {s['long_seq_len']} | before switch (step {s['pretrain_steps']}, "
        f"{s['short_seq_len']} tok) | after switch (step {s['pretrain_steps'] + 1}) | {k5.replace('_', ' ')} "
        f"| end (step {s['pretrain_steps'] + s['continue_steps']}) | {kl.replace('_', ' ')} | layer modes |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in ("sparse", "dense"):
        t = tl[run]
        lines.append(f"| {run} | {fmt(tl['before_switch'])} | {fmt(t['after_switch'])} | {fmt(t[k5])} | "
                     f"{fmt(t['end'])} | {fmt(t[kl])} | {', '.join(t['first_step_modes']) or 'dense'} |")
    lines += [
        "",
        f"Held-out loss ({s['eval_seqs']} fixed sequences per length, data seed {s['eval_seed']}) and greedy "
        f"passkey-retrieval accuracy ({s['probes_per_depth']} probes at each depth; mean (per depth)):",
        "",
        "| weights | evaluated as | seq_len | held-out loss | passkey accuracy | layer modes |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in ev.items():
        lines.append(f"| {e['run']} | {e['attention']} | {e['seq_len']} | {fmt(e['heldout_loss'])} | "
                     f"{acc(name)} | {', '.join(e['modes'])} |")
    w = r["wall_s"]
    lines += ["", "Wall time: " + ", ".join(f"{key} {v:.0f} s" for key, v in w.items()) + "; mean step time "
              + ", ".join(f"{run} {tl[run]['mean_step_time_s']:.2f} s" for run in ("sparse", "dense"))
              + (" (continuations run one after the other)." if s["sequential"]
                 else " (the two continuations run concurrently).")]
    (RESULTS / f"short_to_long-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
