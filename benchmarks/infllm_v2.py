"""InfLLM-V2 benchmark: sparse mode (per-token selection + token-layout sparse
attention) vs dense causal SDPA, forward+backward, and what selection picks.

    python benchmarks/infllm_v2.py                      # CPU: 8K, 16K, 32K, CPU preset
    python benchmarks/infllm_v2.py --seq-lens 32768 --repeats 1

Shapes are the `tiny` model's attention (Hq 4, Hkv 2, D 32), batch 1, fp32 on
CPU (PyTorch paths), bf16 + Triton on CUDA. Parameters are
conf/attention/infllm_v2.yaml (kernel_size 8, kernel_stride 4, block_size 16,
topk 4, init_blocks 1, window_size 32). Inputs are random, so fractions are
the selection's on noise, not a trained model's.

Per row: dense and sparse fwd+bwd seconds, the selection alone, the attended
fraction per token (selected (token, key block) pairs / causal pairs) and per
query block (the union of its tokens' picks / causal block pairs: what a
block-granular kernel would have to visit to be exact), and the share of
picks the CPU path serves per token (not common to the whole query block).

lse: selection with the exact per-head normaliser vs the coarse estimate
(kernels/infllm_v2_ref.py), at --lse-len tokens: selection time, how many
picks differ, and the softmax mass each captures, exp(lse_sparse - lse_dense)
averaged over query heads and tokens (1.0 = the selected blocks hold all of
the dense attention's probability).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.provenance, run as a file

from benchmarks.provenance import finish, markdown_line, provenance  # noqa: E402
from ltrain.kernels import BlockLayout, block_sparse_attention, infllm_v2_attention, infllm_v2_select  # noqa: E402
from ltrain.kernels.infllm_v2 import causal_pairs  # noqa: E402
from ltrain.kernels.token_sparse_cpu import split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
PRESET = dict(OmegaConf.load(REPO / "conf/attention/infllm_v2.yaml").infllm_v2)
SELECT = {key: val for key, val in PRESET.items() if key != "dense_len"}


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


def fractions(layout: BlockLayout, n: int, bs: int) -> dict:
    """Per-token and per-query-block attended fractions, and the per-token share of picks."""
    mask = layout.block_mask()  # [1, Hkv, n, Mk]
    union = mask.unflatten(2, (-1, bs)).any(3)
    m = n // bs
    _, rest = split(layout, bs)
    return dict(token_fraction=mask.sum().item() / (mask.shape[1] * causal_pairs(n, bs)),
                block_union_fraction=union.sum().item() / (mask.shape[1] * m * (m + 1) / 2),
                per_token_share=rest.counts.sum().item() / layout.counts.sum().item())


def speed(n, repeats, dtype, device):
    q, k, v = inputs(n, dtype, device)
    params = dict(PRESET, dense_len=0)

    def sparse():
        out, _ = infllm_v2_attention(q, k, v, **params)
        out.sum().backward()

    def dense():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

    row = dict(seq_len=n, dense_fwd_bwd_s=timed(dense, repeats, device),
               sparse_fwd_bwd_s=timed(sparse, repeats, device),
               select_s=timed(lambda: infllm_v2_select(q, k, **SELECT), repeats, device))
    row["speedup"] = row["dense_fwd_bwd_s"] / row["sparse_fwd_bwd_s"]
    row.update(fractions(infllm_v2_select(q, k, **SELECT), n, PRESET["block_size"]))
    return row


def lse_modes(n, device):
    q, k, v = inputs(n, torch.float32, device, requires_grad=False)
    bs = PRESET["block_size"]
    _, dense_lse = block_sparse_attention(q, k, v, BlockLayout.causal(n // bs, n // bs, device=device),
                                          block_size=bs, return_lse=True)
    out, picks = dict(seq_len=n), {}
    for mode in ("exact", "coarse"):
        t = time.perf_counter()
        layout = infllm_v2_select(q, k, **dict(SELECT, lse=mode))
        out[f"{mode}_select_s"] = time.perf_counter() - t
        _, lse = block_sparse_attention(q, k, v, layout, block_size=bs, return_lse=True)
        out[f"{mode}_mass"] = torch.exp(lse - dense_lse).mean().item()
        picks[mode] = layout.block_mask()
    out["picks_differ"] = (picks["exact"] ^ picks["coarse"]).sum().item() / picks["exact"].sum().item() / 2
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--lse-len", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    prov = provenance(argv, __file__)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    result = dict(**prov, device=f"{device}, {torch.get_num_threads()} torch threads", dtype=str(dtype),
                  params=PRESET, shape="B 1, Hq 4, Hkv 2, D 32", lse=lse_modes(args.lse_len, device), speed=[])
    print(json.dumps(result["lse"]), flush=True)
    for n in args.seq_lens:
        result["speed"].append(speed(n, args.repeats, dtype, device))
        print(json.dumps(result["speed"][-1]), flush=True)
    finish(result)
    tag = "cuda" if device == "cuda" else "cpu"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"infllm_v2-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    e = result["lse"]
    lines = [f"# InfLLM-V2 (per-token selection) vs dense SDPA, forward+backward ({result['device']}, {dtype})", "",
             markdown_line(result), "",
             f"Shape {result['shape']}; parameters {PRESET} (dense_len ignored: sparse forced). Random inputs.", "",
             "| seq_len | dense s | InfLLM-V2 s | of which select s | speedup | attended per token | "
             "per query block (union) | picks served per token |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seq_len']} | {r['dense_fwd_bwd_s']:.3f} | {r['sparse_fwd_bwd_s']:.3f} | {r['select_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['token_fraction']:.4f} | {r['block_union_fraction']:.4f} | "
              f"{r['per_token_share']:.2f} |" for r in result["speed"]]
    lines += ["", f"Selection normaliser at {e['seq_len']} tokens: exact lse {e['exact_select_s']:.3f} s, "
              f"softmax mass captured {e['exact_mass']:.4f}; coarse lse {e['coarse_select_s']:.3f} s, mass "
              f"{e['coarse_mass']:.4f}; {e['picks_differ']:.3f} of the picks differ.", ""]
    (RESULTS / f"infllm_v2-{tag}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
