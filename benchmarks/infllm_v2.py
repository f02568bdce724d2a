"""InfLLM-V2 benchmark: sparse mode (selection + block-sparse attention) vs
dense causal SDPA, forward+backward, and the selection-granularity measurement.

    python benchmarks/infllm_v2.py                     # CPU: 16K, 32K, CPU preset
    python benchmarks/infllm_v2.py --seq-lens 32768 --repeats 1

Shapes are the `tiny` model's attention (Hq 4, Hkv 2, D 32), batch 1, fp32 on
CPU (PyTorch reference paths), bf16 + Triton on CUDA. Parameters are
conf/attention/infllm_v2.yaml (kernel_size 8, kernel_stride 4, block_size 16,
topk 4, init_blocks 1, window_size 32). Inputs are random, so the attended
fraction is the layout's, not a trained model's.

granularity: for each query block, the per-token (paper) selections'
union, which a per-query-block layout would have to attend to be exact,
against the block-granular selection (max over the block's queries), both as
fractions of the causal block pairs, plus the recall of the per-token picks.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ltrain.kernels import infllm_v2_attention, infllm_v2_select

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
PRESET = dict(OmegaConf.load(REPO / "conf/attention/infllm_v2.yaml").infllm_v2)


def inputs(n, dtype, device, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, n, 32, generator=g).to(device, dtype).requires_grad_(requires_grad) for h in (4, 2, 2)]


def timed(fn, repeats, device):
    fn()  # warm-up (and Triton compile)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(n, repeats, dtype, device):
    q, k, v = inputs(n, dtype, device)
    params = dict(PRESET, dense_len=0)
    stats = {}

    def sparse():
        out, s = infllm_v2_attention(q, k, v, **params)
        stats.update(s)
        out.sum().backward()

    def select():
        infllm_v2_select(q, k, **{key: val for key, val in params.items() if key != "dense_len"})

    def dense():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

    row = dict(seq_len=n, dense_fwd_bwd_s=timed(dense, repeats, device),
               sparse_fwd_bwd_s=timed(sparse, repeats, device), select_s=timed(select, repeats, device))
    row.update(speedup=row["dense_fwd_bwd_s"] / row["sparse_fwd_bwd_s"], block_fraction=stats["block_fraction"])
    return row


def granularity(n, device):
    q, k, _ = inputs(n, torch.float32, device, requires_grad=False)
    params = {key: val for key, val in PRESET.items() if key != "dense_len"}
    bs = params["block_size"]
    t = time.perf_counter()
    per_token = infllm_v2_select(q, k, granularity=1, **params).block_mask()  # [1, Hkv, n, Mk]
    per_token_s = time.perf_counter() - t
    t = time.perf_counter()
    per_block = infllm_v2_select(q, k, **params).block_mask()  # [1, Hkv, Mq, Mk]
    per_block_s = time.perf_counter() - t
    union = per_token.unflatten(2, (-1, bs)).any(3)
    mq = n // bs
    causal = per_block.shape[1] * mq * (mq + 1) / 2
    covered = (per_token & per_block.repeat_interleave(bs, dim=2)).sum() / per_token.sum()
    return dict(seq_len=n, union_fraction=union.sum().item() / causal, block_fraction=per_block.sum().item() / causal,
                per_token_recall=covered.item(), select_per_token_s=per_token_s, select_per_block_s=per_block_s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--granularity-len", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, " \
                                                                  f"{torch.get_num_threads()} threads)"
    result = dict(device=name, dtype=str(dtype), params=PRESET, shape="B 1, Hq 4, Hkv 2, D 32",
                  granularity=granularity(args.granularity_len, device), speed=[])
    print(json.dumps(result["granularity"]), flush=True)
    for n in args.seq_lens:
        result["speed"].append(speed(n, args.repeats, dtype, device))
        print(json.dumps(result["speed"][-1]), flush=True)
    tag = "cuda" if device == "cuda" else "cpu"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"infllm_v2-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    g = result["granularity"]
    lines = [f"# InfLLM-V2 vs dense SDPA, forward+backward ({name}, {dtype})", "",
             f"Shape {result['shape']}; parameters {PRESET} (dense_len ignored: sparse forced).", "",
             "| seq_len | dense s | InfLLM-V2 s | of which select s | speedup | attended block fraction |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['seq_len']} | {r['dense_fwd_bwd_s']:.3f} | {r['sparse_fwd_bwd_s']:.3f} | {r['select_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['block_fraction']:.4f} |" for r in result["speed"]]
    lines += ["", f"Selection granularity at {g['seq_len']} tokens (random inputs): union of per-token selections "
              f"{g['union_fraction']:.3f} of causal block pairs vs block-granular {g['block_fraction']:.3f}; "
              f"block-granular layout covers {g['per_token_recall']:.3f} of per-token picks. "
              f"Selection time per-token {g['select_per_token_s']:.3f} s, per-block {g['select_per_block_s']:.3f} s.", ""]
    (RESULTS / f"infllm_v2-{tag}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
