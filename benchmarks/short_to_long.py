"""Short-to-long on CPU: a dense model learns passkey retrieval on short rows, carries it to
its training length, then its weights continue at 4x that length as InfLLM-V2 (dense -> sparse
switch) and as S2, each evaluated by `ltrain-eval` (perplexity by position, passkey accuracy over
lengths x depths, heatmaps).

    python benchmarks/short_to_long.py                   # the README recipe (see its results file for the time)
    python benchmarks/short_to_long.py --control         # also the dense continuation at the long length
    python benchmarks/short_to_long.py --retrieval-steps 4 --pretrain-steps 4 --continue-steps 2 \\
        --short 128 --long 256 --probes 2 --depths 0.5 --tag smoke   # seconds: the plumbing only

Training runs (`ltrain-train` subprocesses, their run directories under --out-dir), each on --ranks
data-parallel ranks (2: torchrun over gloo, --threads torch threads shared among them):

  retrieval  experiment=short-to-long-retrieval: nano model, every layer dense, passkey data at
             --retrieval-len tokens (128), --retrieval-steps steps of 8 rows per rank: where
             retrieval (an induction head) forms, which takes far fewer steps, and far less time,
             on short rows (and at 16 rows per step formed where 8 did not)
  pretrain   experiment=short-to-long-dense trainer.init_from=<retrieval's final checkpoint>: the
             same weights at --short tokens (1024), --pretrain-steps steps, each row packing
             passkey samples of log-uniform lengths in [128, --short] (data.doc_len_min): the
             short ones keep the retrieval, the long ones stretch it to every distance
  infllm_v2  experiment=short-to-long-sparse trainer.init_from=<pretrain's final checkpoint>: the
             same weights at --long tokens (4096), every layer InfLLM-V2 with dense_len = --short,
             so the layers run their top-k sparse mode, and YaRN RoPE scaling by --long / --short
             from --short positions; fresh optimizer and schedule
  s2         experiment=short-to-long-s2 trainer.init_from=<same>: S2 and dense layers alternating,
             the same RoPE scaling
  dense      (--control) experiment=short-to-long-sparse attention=dense: the same continuation dense

Then `ltrain-eval` (subprocess) on each final checkpoint, eval.tasks=[passkey], eval.n=--probes
(probes per depth, and sequences for the perplexity), eval.depths=--depths:

  retrieval at [retrieval-len, short] (dense), pretrain at [short, long] as trained (dense) and,
  with eval.overrides, as each continuation's model (attention and RoPE scaling) without any
  continued training (the switch alone); each continuation at
  [short, 2 short, long].

Writes benchmarks/results/short_to_long-<tag>.{json,md} (benchmarks.provenance's keys, every
ltrain-eval record, training summaries) and each evaluation's passkey heatmap as
benchmarks/results/short_to_long-<tag>/<case>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.provenance, run as a file

from benchmarks.provenance import finish, markdown_line, provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CONTINUATIONS = {"infllm_v2": ["experiment=short-to-long-sparse"], "s2": ["experiment=short-to-long-s2"],
                 "dense": ["experiment=short-to-long-sparse", "attention=dense"]}


def env(threads: int, run: str | None = None) -> dict:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if run:
        e["LTRAIN_RUN_ID"] = run
    return e


def run_logged(cmd: list[str], log: Path, environ: dict) -> float:
    """Run `cmd` from the repository root with its output in `log`; its wall seconds. SystemExit with
    the log's tail when it fails."""
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=REPO, env=environ, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {code}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t


def train(out: Path, run: str, overrides: list[str], args) -> float:
    """One `ltrain-train` run on args.ranks data-parallel ranks (torchrun, gloo), args.threads
    torch threads shared among them."""
    shutil.rmtree(out / run, ignore_errors=True)  # a stale run dir would be auto-resumed
    (out / run).mkdir(parents=True)
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"] if args.ranks > 1 else []
    cmd = [sys.executable, *launch, "-m", "ltrain.train", f"trainer.out_dir={out}", "trainer.progress=false", *overrides]
    return run_logged(cmd, out / f"{run}.stdout", env(max(1, args.threads // args.ranks), run))


def final_checkpoint(out: Path, run: str) -> Path:
    ckpt_dir = out / run / "checkpoints"
    return ckpt_dir / (ckpt_dir / "latest").read_text().strip()


def switch_overrides(run_dir: Path) -> list[str]:
    """eval.overrides that give another run's weights this run's model without its training: its
    attention (pattern, layers, sparse kinds' settings) and its RoPE (every model.rope_* key)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    att = cfg.attention
    layers = "null" if att.layers is None else f"[{','.join(att.layers)}]"
    out = [f"attention.pattern={att.pattern}", f"attention.layers={layers}"]
    out += [f"model.{k}={v}" for k, v in cfg.model.items() if k.startswith("rope_")]
    for kind in ("s2", "infllm_v2"):
        out += [f"attention.{kind}.{k}={v}" for k, v in att[kind].items()]
    return [o.replace(" ", "") for o in out]


def evaluate(out: Path, case: str, run: str, lengths: list[int], args, overrides=()) -> dict:
    """One ltrain-eval of `run`'s final checkpoint -> its eval.json record (+ wall_s)."""
    eval_dir = out / "eval" / case
    shutil.rmtree(eval_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "ltrain.eval_cli", f"eval.checkpoint={final_checkpoint(out, run)}",
           f"eval.out_dir={eval_dir}", f"eval.lengths=[{','.join(map(str, lengths))}]",
           f"eval.depths=[{','.join(f'{d:g}' for d in args.depths)}]", f"eval.n={args.probes}",
           "eval.tasks=[passkey]", f"eval.seed={args.eval_seed}", "eval.progress=false"]
    if overrides:
        cmd.append(f"eval.overrides=[{','.join(overrides)}]")
    wall = run_logged(cmd, out / f"eval-{case}.stdout", env(args.threads))
    record = json.loads((eval_dir / "eval.json").read_text())
    figs = RESULTS / f"short_to_long-{args.tag}"
    figs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(eval_dir / "passkey_heatmap.png", figs / f"{case}.png")
    return {**record, "wall_s": round(wall, 1), "heatmap": f"short_to_long-{args.tag}/{case}.png"}


def train_summary(out: Path, run: str, wall: float | None) -> dict:
    """The run's metrics.jsonl summarised; wall None: not timed (--skip-train)."""
    rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    modes = sorted({v for k, v in rows[-1].items() if k.endswith("/mode")})
    fractions = [v for k, v in rows[-1].items() if k.endswith("/block_fraction")]
    return {"steps": rows[-1]["step"], "seq_len": rows[-1]["seq_len"], "first_logged_loss": rows[0]["loss"],
            "first_logged_step": rows[0]["step"], "final_loss": rows[-1]["loss"],
            "mean_step_time_s": sum(r["step_time_s"] for r in rows) / len(rows), "wall_s": None if wall is None else round(wall, 1),
            "layer_modes": modes, "mean_block_fraction": sum(fractions) / len(fractions) if fractions else 1.0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--retrieval-steps", type=int, default=6000)
    ap.add_argument("--retrieval-len", type=int, default=128, help="stage 0 seq_len (short rows: retrieval forms)")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--continue-steps", type=int, default=100)
    ap.add_argument("--short", type=int, default=1024, help="pretraining seq_len (= the continuation's dense_len)")
    ap.add_argument("--long", type=int, default=4096, help="continuation seq_len")
    ap.add_argument("--control", action="store_true", help="also continue dense at --long")
    ap.add_argument("--probes", type=int, default=10, help="ltrain-eval eval.n")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--eval-seed", type=int, default=4321)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run, shared by its ranks (runs are sequential)")
    ap.add_argument("--ranks", type=int, default=2,
                    help="data-parallel ranks per training run (each its data.micro_batch_size rows per step)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "outputs" / "short_to_long")
    ap.add_argument("--skip-train", action="store_true", help="evaluate the runs already in --out-dir")
    ap.add_argument("--tag", default="cpu", help="results file suffix")
    args = ap.parse_args(argv)
    if args.ranks < 1:
        ap.error(f"--ranks={args.ranks}: need at least one data-parallel rank")
    prov = provenance(argv, __file__)
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    kinds = ["infllm_v2", "s2"] + (["dense"] if args.control else [])
    short_steps = (["optim.warmup_steps=2"]
                   if min(args.retrieval_steps, args.pretrain_steps, args.continue_steps) <= 10 else [])

    walls = {}
    if not args.skip_train:
        walls["retrieval"] = train(out, "retrieval", ["experiment=short-to-long-retrieval", "trainer.resume=none",
                                                      f"data.seq_len={args.retrieval_len}",
                                                      f"trainer.max_steps={args.retrieval_steps}", *short_steps],
                                   args)
        walls["pretrain"] = train(out, "pretrain", ["experiment=short-to-long-dense", "trainer.resume=none",
                                                    f"trainer.init_from={final_checkpoint(out, 'retrieval')}",
                                                    f"data.seq_len={args.short}",
                                                    f"trainer.max_steps={args.pretrain_steps}", *short_steps],
                                  args)
        init = final_checkpoint(out, "pretrain")
        for kind in kinds:
            walls[kind] = train(out, kind, [*CONTINUATIONS[kind], "trainer.resume=none", f"trainer.init_from={init}",
                                            f"data.seq_len={args.long}", f"attention.infllm_v2.dense_len={args.short}",
                                            f"model.rope_factor={args.long / args.short:g}",
                                            f"model.rope_original_max_positions={args.short}",
                                            f"trainer.max_steps={args.continue_steps}", *short_steps], args)
    runs = {run: train_summary(out, run, walls.get(run)) for run in ["retrieval", "pretrain", *kinds]}

    evals = {"retrieval": evaluate(out, "retrieval", "retrieval", sorted({args.retrieval_len, args.short}), args),
             "pretrain": evaluate(out, "pretrain", "pretrain", [args.short, args.long], args)}
    for kind in kinds:
        if kind != "dense":
            evals[f"pretrain-as-{kind}"] = evaluate(out, f"pretrain-as-{kind}", "pretrain", [args.short, args.long],
                                                    args, switch_overrides(out / kind))
        evals[kind] = evaluate(out, kind, kind, sorted({args.short, 2 * args.short, args.long}), args)
    result = {**finish(prov), "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "train": runs, "eval": evals}
    write(result, args.tag)


def write(r: dict, tag: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"short_to_long-{tag}.json").write_text(json.dumps(r, indent=1) + "\n")
    s, runs, ev = r["settings"], r["train"], r["eval"]
    walls = [runs["retrieval"]["wall_s"], runs["pretrain"]["wall_s"]]
    to_short = "not timed (--skip-train)" if None in walls else f"{sum(walls):.0f} s wall"
    lines = [f"# Short-to-long: dense at {s['retrieval_len']} -> {s['short']} tokens -> InfLLM-V2 and S2 at {s['long']}",
             "", markdown_line(r), "",
             "Training runs (`ltrain-train`, one after another, "
             f"{s['ranks']} data-parallel rank(s) sharing {s['threads']} torch threads; each run starts from the previous stage's final weights, "
             "`trainer.init_from`, with a fresh optimizer and schedule: pretrain from retrieval, the "
             f"continuations from pretrain). Training to the {s['short']}-token model (retrieval + pretrain): "
             f"{to_short}.", "",
             "| run | steps | seq_len | layer modes | attended fraction | first logged loss | final loss "
             "| mean step time (s) | wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for run, t in runs.items():
        wall = "-" if t["wall_s"] is None else f"{t['wall_s']:.0f}"
        lines.append(f"| {run} | {t['steps']} | {t['seq_len']} | {', '.join(t['layer_modes'])} | "
                     f"{t['mean_block_fraction']:.3f} | {t['first_logged_loss']:.4f} (step {t['first_logged_step']}) "
                     f"| {t['final_loss']:.4f} | {t['mean_step_time_s']:.2f} | {wall} |")
    lines += ["", f"`ltrain-eval` (greedy passkey retrieval, {s['probes']} probes per depth; perplexity over "
              f"{s['probes']} held-out sequences): mean accuracy over depths {s['depths']}, and the heatmap", "",
              "| weights | evaluated as | length | passkey accuracy (mean) | per depth | perplexity | layer modes "
              "| heatmap |", "|---|---|---|---|---|---|---|---|"]
    for case, e in ev.items():
        weights, as_ = (case.split("-as-") + [None])[:2] if "-as-" in case else (case, None)
        kind = as_ or ("dense" if weights in ("retrieval", "pretrain", "dense") else weights)
        for length, acc in e["results"]["passkey"].items():
            depths = ", ".join(f"{d}: {v:.1f}" for d, v in acc.items() if d != "mean")
            modes = ", ".join(sorted(set(e["results"]["layer_modes"][length]))) or "dense"
            ppl = e["results"]["perplexity"][length]["perplexity"]
            lines.append(f"| {weights} | {kind} | {length} | {acc['mean']:.2f} | {depths} | {ppl:.3f} | {modes} "
                         f"| [png]({e['heatmap']}) |")
    lines += ["", "Wall time of the evaluations: " + ", ".join(f"{c} {e['wall_s']:.0f} s" for c, e in ev.items()) + "."]
    (RESULTS / f"short_to_long-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
