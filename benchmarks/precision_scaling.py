"""Half-precision error of the context-parallel collectives against the number of ranks (CPU, gloo).

    python -m benchmarks.precision_scaling                 # N = 4096, cp = 1 2 4 8, bf16
    python -m benchmarks.precision_scaling --seq-len 1024 --cps 1 2 --collectives ring lasp2

Per collective and cp degree: the collective runs on cp real gloo processes
(tests/multiproc.run_ranks, one torch thread each) in bf16, its output and
gradients are gathered to rank 0, and their max abs error against the fp32
one-process reference on the same rounded inputs is recorded next to the
error of the plain half-precision implementation (the yardstick of
docs/algorithms.md#half-precision-test-criterion; it runs on one process, so
it does not depend on cp). The workers, inputs, references and yardsticks are
the half-precision tests' (tests/parallel/test_{ring,ulysses,lasp2,lasp2h}.py):

    ring     ring_attention, zigzag, causal layout, dense_block_size of a chunk   yardstick: masked causal SDPA
    ulysses  ulysses_attention, zigzag, the CPU block-sparse kernel (causal)      yardstick: masked causal SDPA
    lasp2    lasp2_linear_attention, contiguous, learned decay (0.999, 0.99)      yardstick: quadratic (QK^T*D)V
    lasp2h   lasp2h_attention, zigzag                                             yardstick: masked causal SDPA
    infllm   lasp2h_sparse_attention (InfLLM-V2 selection), zigzag                yardstick: SDPA, causal & selection

cp = 1 is the same code on one process (the ring with one step, one chunk
state, ...), so the columns show what the rank count adds. "ratio" is the
collective's error over the yardstick's (the criterion: <= 2 outputs, <= 3
gradients). Ulysses needs cp to divide its 4 query heads: cp = 8 is skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.provenance, run as a file

from benchmarks.provenance import finish, markdown_line, provenance, write_results  # noqa: E402
from tests.multiproc import run_ranks  # noqa: E402
from tests.parallel import test_lasp2, test_lasp2h, test_ring, test_ulysses  # noqa: E402
from tests.precision import FWD_FACTOR, GRAD_FACTOR, max_err  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _ring(n, dtype, mode="zigzag"):
    return (test_ring._ring_half, [(dtype, mode)], (dtype, mode),
            lambda: test_ring.causal_sdpa_yardsticks(*test_ring.half_inputs(n, dtype)), mode)


def _ulysses(n, dtype, mode="zigzag"):
    return (test_ulysses._ulysses_half, [(dtype, mode)], (dtype, mode),
            lambda: test_ring.causal_sdpa_yardsticks(*test_ulysses.half_inputs(n, dtype)), mode)


def _lasp2(n, dtype, mode="contiguous"):
    return (test_lasp2._lasp2_half, [(dtype, mode)], (dtype, mode),
            lambda: test_lasp2.lasp2_yardsticks(*test_lasp2.half_inputs(n, dtype)), mode)


def _lasp2h(n, dtype, mode="zigzag", kind="dense"):
    def yard():
        q, k, v, do = test_lasp2h.half_inputs(n, dtype)
        if kind == "dense":
            return test_ring.causal_sdpa_yardsticks(q, k, v, do)
        mask = test_lasp2h.sparse_mask(q, k)
        return (test_ring.masked_sdpa_grads(q, k, v, do, mask),
                test_ring.masked_sdpa_grads(*(t.float() for t in (q, k, v, do)), mask))
    return test_lasp2h._lasp2h_half, [(kind, dtype, mode)], (kind, dtype, mode), yard, mode


COLLECTIVES = {
    "ring": (_ring, test_ring.SDPA_YARDSTICK),
    "ulysses": (_ulysses, test_ring.SDPA_YARDSTICK),
    "lasp2": (_lasp2, test_lasp2.QUADRATIC_YARDSTICK),
    "lasp2h": (_lasp2h, test_ring.SDPA_YARDSTICK),
    "infllm": (lambda n, dtype: _lasp2h(n, dtype, kind="sparse"), test_lasp2h.SPARSE_YARDSTICK),
}


def skip_reason(name: str, cp: int) -> str | None:
    if name == "ulysses" and test_ulysses.HALF_HQ % cp:
        return f"Ulysses needs cp to divide the {test_ulysses.HALF_HQ} query heads"
    return None


def measure(args) -> list[dict]:
    rows = []
    for name in args.collectives:
        build, yardstick = COLLECTIVES[name]
        for dname in args.dtypes:
            worker, cases, key, yard, mode = build(args.seq_len, DTYPES[dname])
            plain, want = yard()
            plain_err = {k: max_err(plain[k], want[k]) for k in want}
            row = dict(collective=name, mode=mode, dtype=dname, seq_len=args.seq_len, yardstick=yardstick,
                       plain_err=plain_err, by_cp={})
            for cp in args.cps:
                reason = skip_reason(name, cp)
                if reason:
                    row["by_cp"][str(cp)] = {"skipped": reason}
                    continue
                t0 = time.time()
                got = run_ranks(worker, cp, args.seq_len, cases, timeout=args.timeout)[0][key]
                err = {k: max_err(got[k], want[k]) for k in want}
                ratio = {k: err[k] / plain_err[k] if plain_err[k] else float("inf") for k in want}
                ok = all(ratio[k] <= (FWD_FACTOR if k == "out" else GRAD_FACTOR) for k in want)
                row["by_cp"][str(cp)] = dict(err=err, ratio=ratio, meets_criterion=ok,
                                             wall_s=round(time.time() - t0, 1))
                print(f"{name} {dname} cp={cp}: {err} (plain {plain_err})", flush=True)
            rows.append(row)
    return rows


def growth(row: dict) -> dict:
    """Per tensor: max error over cp > 1 / error at cp = 1 (None without both)."""
    done = {int(c): r for c, r in row["by_cp"].items() if "err" in r}
    if 1 not in done or len(done) < 2:
        return {}
    return {k: max(r["err"][k] for c, r in done.items() if c > 1) / done[1]["err"][k] if done[1]["err"][k] else None
            for k in done[1]["err"]}


def markdown(report: dict) -> str:
    cps = report["cps"]
    lines = [f"# Half-precision error of the collectives vs the number of ranks (N = {report['seq_len']})", "",
             markdown_line(report), "",
             "Max abs error against the fp32 one-process reference on the same rounded inputs; 'plain' is the "
             "yardstick (the plain half-precision implementation on one process, named per collective below); "
             "in brackets the ratio to it (criterion: <= 2 for out, <= 3 for gradients). 'growth' = the largest "
             "error at cp > 1 over the error at cp = 1.", ""]
    head = ["collective", "dtype", "tensor", "plain"] + [f"cp={c}" for c in cps] + ["growth"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        g = growth(row)
        for k, p in row["plain_err"].items():
            cells = []
            for c in cps:
                r = row["by_cp"].get(str(c), {})
                cells.append("skipped" if "skipped" in r else f"{r['err'][k]:.3g} ({r['ratio'][k]:.2f})" if r else "")
            gk = g.get(k)
            lines.append("| " + " | ".join([f"{row['collective']} ({row['mode']})", row["dtype"], k, f"{p:.3g}", *cells,
                                            "" if gk is None else f"{gk:.2f}"]) + " |")
    lines += ["", "Yardsticks: " + "; ".join(sorted({f"{r['collective']}: {r['yardstick']}" for r in report["rows"]})),
              ""]
    fails = [(r["collective"], c) for r in report["rows"] for c, x in r["by_cp"].items()
             if "err" in x and not x["meets_criterion"]]
    lines.append(f"**Criterion not met at: {fails}.**" if fails else
                 "Every measured (collective, cp) meets the 2x / 3x criterion.")
    skipped = sorted({x["skipped"] for r in report["rows"] for x in r["by_cp"].values() if "skipped" in x})
    if skipped:
        lines.append("Skipped: " + "; ".join(skipped) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--collectives", nargs="+", default=list(COLLECTIVES), choices=list(COLLECTIVES))
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run_ranks call, seconds")
    parser.add_argument("--tag", default="cpu", help="results file suffix")
    args = parser.parse_args(argv)
    prov = provenance(argv, __file__)
    rows = measure(args)
    report = {**finish(prov), "seq_len": args.seq_len, "cps": args.cps, "dtypes": args.dtypes,
              "criterion": {"out": FWD_FACTOR, "gradients": GRAD_FACTOR}, "rows": rows}
    write_results(f"precision_scaling-{args.tag}", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
