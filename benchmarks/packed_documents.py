"""Packed documents with masking against padding each document to its own row (CPU, one layer).

    STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
    ltrain-prepare "$STDLIB" /tmp/stdlib --ext .py --exclude site-packages
    python -m benchmarks.packed_documents --data /tmp/stdlib

Per --seq-lens N: one packed row of the real loader (ltrain.data build_loader, data.kind=memmap,
pack=true, document masking on, seed --seed): the first row in the sampler's order holding at
least --min-docs documents (a row of one document has nothing to compare; the documents are the
row's pieces, the first possibly the tail of a document and the last cut at the row end, as the
loader cuts them). One attention layer, B=1 row, --heads heads (Hq = Hkv), head dim 64, fp32,
random q, k, v and output gradient, one torch thread; timed: forward, then backward (o.backward(do)):

    packed_masked    kernels.block_sparse_attention over BlockLayout.causal (block 64) with
                     q_doc = k_doc = the row's doc_ids: the dense kind with documents
    padded_sdpa      each document in its own row, every row padded to the longest document
                     rounded up to 64, torch SDPA is_causal=True over [docs, H, L_pad, D]
                     (zero output gradient on padding): the plain padding baseline
    packed_unmasked  the packed row without doc ids, block_sparse_attention over the same causal
                     layout: attends across documents (the old behaviour, same kernel as packed_masked)
    packed_sdpa      the packed row without doc ids through SDPA is_causal=True: what the dense
                     kind ran before documents were masked (the old code path)

tokens/s counts real tokens only (N for every variant: the same documents), over forward +
backward wall time; CPU time (process_time) is reported too, since the machine may be shared.
Attended (query block, key block) pairs are per head: the causal pairs whose doc-id ranges
intersect (packed_masked, benchmarks.doc_balance's count), docs x M_pad (M_pad + 1) / 2 for the
padded rows, M (M + 1) / 2 for the unmasked row. Each timing is the median of --repeats runs
after one untimed warm-up of every variant at a short length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.provenance, run as a file

from benchmarks.doc_balance import packed_loader  # noqa: E402
from benchmarks.provenance import finish, markdown_line, provenance, write_results  # noqa: E402
from ltrain.kernels import BlockLayout, block_sparse_attention  # noqa: E402
from ltrain.parallel.balance import attended_blocks  # noqa: E402

D, BS = 64, 64
VARIANTS = ("packed_masked", "padded_sdpa", "packed_unmasked", "packed_sdpa")


def pick_row(data: str, seq_len: int, min_docs: int, seed: int, limit: int = 4096):
    """(doc_ids [1, N] int32, sample index, position in the loader's order): the first row of the
    loader's order with at least min_docs documents."""
    loader = packed_loader(data, seq_len, seed)
    order = loader.sampler._permutation()  # what next_batch takes, for the record
    for pos in range(min(limit, loader.source.num_samples)):
        doc_ids = loader.next_batch()["doc_ids"].to(torch.int32)
        if int(doc_ids[0, -1] - doc_ids[0, 0]) + 1 >= min_docs:
            return doc_ids, int(order[pos]), pos
    raise SystemExit(f"no row of {seq_len} tokens with >= {min_docs} documents in the first {limit}")


def _layer(variant: str, q, k, v, doc_ids, lengths, heads: int):
    """(fn(q, k, v) -> out, the output gradient's mask or None, inputs) for one variant."""
    n = q.shape[2]
    if variant == "padded_sdpa":
        l_pad = -(-max(lengths) // BS) * BS
        qp, kp, vp = (torch.zeros(len(lengths), heads, l_pad, D) for _ in range(3))
        keep = torch.zeros(len(lengths), 1, l_pad, 1)
        start = 0
        for i, ln in enumerate(lengths):
            for dst, src in ((qp, q), (kp, k), (vp, v)):
                dst[i, :, :ln] = src[0, :, start:start + ln]
            keep[i, :, :ln] = 1
            start += ln
        return (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)), keep, (qp, kp, vp)
    if variant == "packed_sdpa":
        return (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)), None, (q, k, v)
    layout = BlockLayout.causal(n // BS, n // BS)  # built once, as the layer caches it
    docs = dict(q_doc=doc_ids, k_doc=doc_ids) if variant == "packed_masked" else {}
    return (lambda a, b, c: block_sparse_attention(a, b, c, layout, block_size=BS, **docs)), None, (q, k, v)


def time_variant(variant: str, doc_ids, lengths, heads: int, repeats: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = doc_ids.shape[1]
    q, k, v = (torch.randn(1, heads, n, D, generator=g) for _ in range(3))
    fn, keep, inputs = _layer(variant, q, k, v, doc_ids, lengths, heads)
    do = torch.randn(inputs[0].shape, generator=g)
    if keep is not None:
        do = do * keep
    fwd, bwd, cpu = [], [], []
    for _ in range(repeats):
        leaves = [t.clone().requires_grad_() for t in inputs]
        c0, t0 = time.process_time(), time.perf_counter()
        o = fn(*leaves)
        t1 = time.perf_counter()
        o.backward(do)
        t2, c2 = time.perf_counter(), time.process_time()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        cpu.append(c2 - c0)
    total = [a + b for a, b in zip(fwd, bwd)]
    return dict(forward_s=statistics.median(fwd), backward_s=statistics.median(bwd), step_s=statistics.median(total),
                step_cpu_s=statistics.median(cpu), step_s_all=total, tokens_per_s=n / statistics.median(total),
                tokens_per_cpu_s=n / statistics.median(cpu))


def attended_pairs(variant: str, doc_ids, lengths) -> int:
    m = doc_ids.shape[1] // BS
    if variant == "packed_masked":
        return int(attended_blocks(doc_ids, m, BS).sum())
    if variant == "padded_sdpa":
        m_pad = -(-max(lengths) // BS)
        return len(lengths) * m_pad * (m_pad + 1) // 2
    return m * (m + 1) // 2


def measure(args) -> list[dict]:
    warm = torch.zeros(1, 2 * BS, dtype=torch.int32)
    warm[:, BS + 7:] = 1
    for variant in args.variants:  # one untimed run of every code path
        time_variant(variant, warm, [BS + 7, BS - 7], args.heads, 1)
    rows = []
    for seq_len in args.seq_lens:
        doc_ids, sample, pos = pick_row(args.data, seq_len, args.min_docs, args.seed)
        lengths = torch.unique_consecutive(doc_ids[0], return_counts=True)[1].tolist()
        for variant in args.variants:
            r = time_variant(variant, doc_ids, lengths, args.heads, args.repeats)
            pairs = attended_pairs(variant, doc_ids, lengths)
            m = seq_len // BS
            row = dict(seq_len=seq_len, variant=variant, sample=sample, loader_position=pos, docs=len(lengths),
                       doc_lengths=lengths, padded_len=-(-max(lengths) // BS) * BS if variant == "padded_sdpa" else None,
                       attended_pairs=pairs, causal_pairs=m * (m + 1) // 2, **r)
            rows.append(row)
            print(f"N={seq_len} {variant}: {r['tokens_per_s']:.0f} tok/s (fwd {r['forward_s']:.2f} s, bwd "
                  f"{r['backward_s']:.2f} s, CPU {r['step_cpu_s']:.2f} s), pairs {pairs}", flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Packed documents: masked packing against padding, one attention layer, B1 H{report['heads']} "
             f"D{D} fp32, block {BS}, CPU, 1 thread", "", markdown_line(report), "",
             f"Rows: per length, the first row of the loader's order (seed {report['seed']}, {report['data']}, "
             f"Python stdlib .py files, byte tokenizer, pack=true) with at least {report['min_docs']} documents; "
             f"documents as the loader cuts them. Forward + backward, median of {report['repeats']} timed "
             "run(s) after one short warm-up; tokens/s counts real tokens (the row's N) over wall time, and over "
             "process CPU time (less exposed to the other jobs on this shared machine). Attended pairs: "
             "(query block, key block) pairs per head; padded: every padded row's causal pairs.", "",
             "- packed_masked: block_sparse_attention, causal layout, q_doc = k_doc = doc_ids (the dense kind now)",
             "- padded_sdpa: each document its own row, padded to the longest rounded up to 64, SDPA is_causal",
             "- packed_unmasked: the same kernel as packed_masked without doc ids (attends across documents)",
             "- packed_sdpa: SDPA is_causal on the packed row without doc ids (the dense kind before masking)", ""]
    head = ["tokens", "docs (lengths)", "variant", "fwd (s)", "bwd (s)", "tokens/s", "tokens/CPU s",
            "attended pairs", "of causal", "vs packed_masked (wall)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["seq_len"]: r for r in report["rows"] if r["variant"] == "packed_masked"}
    for r in report["rows"]:
        b = base.get(r["seq_len"])
        lens = ", ".join(map(str, r["doc_lengths"])) + f"; sample {r['sample']}, loader row {r['loader_position']}"
        if r["padded_len"]:
            lens += f"; padded to {r['padded_len']}"
        lines.append("| " + " | ".join([
            str(r["seq_len"]), f"{r['docs']} ({lens})", r["variant"], f"{r['forward_s']:.2f}", f"{r['backward_s']:.2f}",
            f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_cpu_s']:.0f}", str(r["attended_pairs"]),
            f"{r['attended_pairs'] / r['causal_pairs']:.1%}",
            f"{b['step_s'] / r['step_s']:.2f}x" if b else "-"]) + " |")
    lines += ["", "'vs packed_masked' is packed_masked's step time over this variant's (above 1: this variant is "
              "faster). SDPA (torch's CPU flash kernel) and block_sparse_attention (the CPU reference path) are "
              "different kernels, so compare packed_masked with packed_unmasked for what the document skip saves, "
              "and padded_sdpa with packed_sdpa for what padding costs in the same kernel."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/stdlib", help="directory written by ltrain-prepare")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant (median)")
    parser.add_argument("--min-docs", type=int, default=3, help="the row's documents, at least")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="cpu", help="results file suffix")
    args = parser.parse_args(argv)
    prov = provenance(argv, __file__)
    torch.set_num_threads(1)
    rows = measure(args)
    report = {**finish(prov), "data": args.data, "heads": args.heads, "head_dim": D, "block_size": BS,
              "dtype": "float32", "threads": 1, "repeats": args.repeats, "min_docs": args.min_docs,
              "seed": args.seed, "rows": rows}
    write_results(f"packed_documents-{args.tag}", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
