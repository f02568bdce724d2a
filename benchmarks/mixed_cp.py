"""The mixed model (attention=mixed: S2, InfLLM-V2, lightning, dense) under
context parallelism on CPU gloo ranks: per-rank attended work and step time,
zigzag split (what ltrain uses) against a contiguous split (the alternative).

Per (seq_len, cp, split), on real gloo processes (tests/multiproc.run_ranks,
one thread per rank), the tiny mixed model with B = 1:
    step_s        forward + backward of the model (lm_loss, cp collectives
                  included; no optimizer, no dp gradient reduction), median of
                  --steps timed steps after one warm-up, max over ranks (the
                  ranks wait for each other in the collectives, so the max is
                  the step).
    rank_step_s   the same per rank: equal-ish by construction (collectives
                  synchronise); the imbalance shows in the work columns.
    s2_pairs, dense_pairs, infllm_pairs
                  per rank, attended (query token, key block) pairs of the S2,
                  dense and InfLLM-V2 layer: for S2 and dense the tiles the ring
                  computes on that rank (parallel.ring.ring_plan; a block pair
                  counts block_size query tokens), for InfLLM-V2 the per-token
                  picks (infllm_v2_select on random q, k: the count of picks per
                  token is set by topk, init, window and causality, not by the
                  data) of the tokens the rank holds. Lightning work is the
                  same under either split (tokens per rank).
    imbalance     max / min over ranks of the three pair counts summed.

    python -m benchmarks.mixed_cp [--seq-lens 2048 4096] [--cps 2 4] [--steps 3]

Writes benchmarks/results/mixed_cp-cpu.json and .md with the command, the git
commit, the machine and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))  # tests.multiproc and benchmarks.provenance, when run as a script

from benchmarks.provenance import finish, markdown_line, provenance  # noqa: E402


def load_config(seq_len: int):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from ltrain.config import register_configs

    register_configs()
    with initialize_config_module("ltrain.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=["attention=mixed", f"data.seq_len={seq_len}"]))


def attended_pairs(cfg, seq_len: int, cp: int, mode: str) -> list[dict]:
    """Per rank: attended (query token, key block) pairs of the S2, dense and InfLLM-V2 layer."""
    from ltrain.kernels.infllm_v2 import infllm_v2_select
    from ltrain.kernels.layout import BlockLayout
    from ltrain.kernels.s2 import s2_layout
    from ltrain.parallel.ring import ring_plan
    from ltrain.parallel.sharding import chunk_ids

    s2, iv2, m = cfg.attention.s2, cfg.attention.infllm_v2, cfg.model
    layouts = {
        "s2": (s2_layout(m.n_heads, seq_len, block_size=s2.block_size, local_blocks=s2.local_blocks,
                         vert_stride=s2.vert_stride, homo_head=s2.homo_head,
                         head_sliding_offset=s2.head_sliding_offset, num_dense_heads=s2.num_dense_heads),
               s2.block_size),
        "dense": (BlockLayout.causal(seq_len // 64, seq_len // 64), 64),
    }
    g = torch.Generator().manual_seed(0)
    hd = m.dim // m.n_heads
    q = torch.randn(1, m.n_heads, seq_len, hd, generator=g)
    k = torch.randn(1, m.n_kv_heads, seq_len, hd, generator=g)
    picks = infllm_v2_select(q, k, kernel_size=iv2.kernel_size, kernel_stride=iv2.kernel_stride,
                             block_size=iv2.block_size, topk=iv2.topk, init_blocks=iv2.init_blocks,
                             window_size=iv2.window_size, lse=iv2.lse).counts[0].sum(0)  # [N]: over KV groups
    chunk = seq_len // (2 * cp if mode == "zigzag" else cp)
    rows = []
    for r in range(cp):
        row = {}
        for name, (layout, bs) in layouts.items():
            heads = layout.counts.shape[1]
            tiles = [t for src in ring_plan(layout, r, cp, mode, bs) for t in src]
            row[f"{name}_pairs"] = sum(int(t.layout.counts.sum()) for t in tiles) * bs // heads
        row["infllm_pairs"] = sum(int(picks[c * chunk:(c + 1) * chunk].sum()) for c in chunk_ids(r, cp, mode)) \
            // m.n_kv_heads
        rows.append(row)
    return rows


def _time_rank(rank, world_size, seq_len, mode, steps):
    import torch.distributed as dist

    from ltrain.loss import lm_loss
    from ltrain.models.transformer import Transformer
    from ltrain.parallel.sharding import shard_sequence

    cfg = load_config(seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.attention)
    model.cp_mode = mode
    ids = torch.randint(0, cfg.model.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(seq_len).unsqueeze(0)
    group = dist.group.WORLD if world_size > 1 else None
    local = [shard_sequence(t, rank, world_size, mode=mode) if group else t
             for t in (ids[:, :-1], ids[:, 1:], positions)]
    times = []
    for _ in range(steps + 1):
        if group:
            dist.barrier()
        t = time.perf_counter()
        logits = model(local[0], local[2], group, "ring")
        loss, _, _ = lm_loss(logits, local[1], group)
        loss.backward()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--cps", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    args = ap.parse_args(argv)
    from tests.multiproc import run_ranks

    result = dict(**provenance(argv, __file__), threads="1 per rank",
                  model="tiny, attention=mixed (SILD), B 1, fp32", rows=[])
    for n in args.seq_lens:
        cfg = load_config(n)
        base = run_ranks(_time_rank, 1, n, "zigzag", args.steps, timeout=1800)[0]
        result["rows"].append(dict(seq_len=n, cp=1, split="-", step_s=base, rank_step_s=[base],
                                   ranks=attended_pairs(cfg, n, 1, "contiguous"), imbalance=1.0))
        print(json.dumps(result["rows"][-1]), flush=True)
        for cp in args.cps:
            for mode in ("zigzag", "contiguous"):
                per_rank = run_ranks(_time_rank, cp, n, mode, args.steps, timeout=1800)
                ranks = attended_pairs(cfg, n, cp, mode)
                work = [sum(r.values()) for r in ranks]
                result["rows"].append(dict(seq_len=n, cp=cp, split=mode, step_s=max(per_rank), rank_step_s=per_rank,
                                           ranks=ranks, imbalance=max(work) / min(work)))
                print(json.dumps(result["rows"][-1]), flush=True)
    finish(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixed_cp-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Mixed model (S2, InfLLM-V2, lightning, dense) under cp: zigzag vs contiguous", "",
             markdown_line(result), "",
             f"Model {result['model']}, one torch thread per rank. Step = fwd+bwd with the cp collectives, no optimizer. Pairs = attended "
             "(query token, key block) pairs per rank (S2 / dense / InfLLM-V2 layer), see the module docstring.",
             "", "| seq_len | cp | split | step s | S2 pairs per rank | dense pairs per rank | "
             "InfLLM-V2 pairs per rank | max/min work |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cols = [" / ".join(f"{x[key]:,}" for x in r["ranks"]) for key in ("s2_pairs", "dense_pairs", "infllm_pairs")]
        lines.append(f"| {r['seq_len']} | {r['cp']} | {r['split']} | {r['step_s']:.3f} | {cols[0]} | {cols[1]} | "
                     f"{cols[2]} | {r['imbalance']:.2f} |")
    (RESULTS / "mixed_cp-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
