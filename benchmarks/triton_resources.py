"""Registers, spills and shared memory of every Triton kernel, compiled ahead of time for sm_80 and sm_90.

    python -m benchmarks.triton_resources                    # every launch ltrain can make
    python -m benchmarks.triton_resources --default-only     # the launches of the shipped presets
    python -m benchmarks.triton_resources --minimal --json /tmp/r.json   # what the default test compiles

No GPU needed: each kernels/*_triton.py module that defines `aot_specs()` lists its launches
with the launch parameters its launcher uses (kernels/aot.py), and `compile_spec` compiles them
with triton.compile for a named target and reads REG / STACK from `cuobjdump -res-usage` and
the dynamic shared memory from the kernel's metadata. A row is ok when nothing spills and
the shared memory fits the arch's opt-in limit per block (kernels/aot.py SHARED_LIMITS).

--minimal keeps, per (kernel, arch, dtype), the default launch with the largest head dim, block
size and GQA group (the one with the most registers and shared memory; the full default run
checks the rest). compile_s is wall time on a possibly shared machine (see the load average).
Results: benchmarks/results/triton_resources[-default|-minimal].{json,md}; exit status 1 when a
default launch spills or overflows shared memory.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.provenance, run as a file

from benchmarks.provenance import finish, markdown_line, provenance  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
_specs_cache: dict = {}


def spec_modules() -> list[str]:
    """ltrain.kernels.<name> of every kernels/*_triton.py that defines aot_specs."""
    names = [f"ltrain.kernels.{p.stem}" for p in sorted(KERNELS_DIR.glob("*_triton.py"))]
    return [n for n in names if hasattr(importlib.import_module(n), "aot_specs")]


def _specs(module: str) -> list:
    if module not in _specs_cache:
        _specs_cache[module] = importlib.import_module(module).aot_specs()
    return _specs_cache[module]


def _archs(spec) -> tuple:
    from ltrain.kernels.aot import ARCHS
    return (spec.config["arch"],) if "arch" in spec.config else ARCHS


def _sort_key(config: dict) -> tuple:
    return tuple(config.get(k, 0) for k in ("head_dim", "block_size", "group", "kernel_size"))


def select(mode: str) -> list[tuple[str, int, int]]:
    """(module, spec index, arch) of the launches to compile: mode "all", "default" or "minimal"."""
    jobs = [(m, i, a) for m in spec_modules() for i, s in enumerate(_specs(m)) for a in _archs(s)
            if mode == "all" or s.default]
    if mode != "minimal":
        return jobs
    best: dict = {}
    for m, i, a in jobs:
        s = _specs(m)[i]
        key = (s.kernel, a, s.config.get("dtype"))
        if key not in best or _sort_key(s.config) > _sort_key(_specs(m)[best[key][1]].config):
            best[key] = (m, i, a)
    return list(best.values())


def compile_row(job: tuple[str, int, int]) -> dict:
    """One report row: the spec's kernel, arch, config and default flag, its launch options and resources."""
    from ltrain.kernels.aot import SHARED_LIMITS, compile_spec
    module, index, arch = job
    spec = _specs(module)[index]
    try:
        res = compile_spec(spec, arch)
    except Exception as exc:  # a launch that does not compile is a row too, reported as not ok
        res = dict(registers=None, spill_bytes=None, shared_bytes=None, compile_s=None,
                   error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    config = {k: v for k, v in spec.config.items() if k != "arch"}
    ok = "error" not in res and res["spill_bytes"] == 0 and res["shared_bytes"] <= SHARED_LIMITS[arch]
    return dict(kernel=spec.kernel, arch=f"sm_{arch}", config=config, default=spec.default,
                num_warps=spec.num_warps, num_stages=spec.num_stages, **res, shared_limit=SHARED_LIMITS[arch], ok=ok)


def run(jobs: list, workers: int) -> list[dict]:
    """Compile the jobs, kernel by kernel with a progress line each, on `workers` processes."""
    by_kernel: dict = {}
    for job in jobs:
        by_kernel.setdefault(_specs(job[0])[job[1]].kernel, []).append(job)
    rows = []
    with ProcessPoolExecutor(workers) as pool:
        for kernel, group in by_kernel.items():
            for row in tqdm(pool.map(compile_row, group), total=len(group), desc=kernel, file=sys.stderr):
                rows.append(row)
    return rows


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def markdown(report: dict) -> str:
    rows = report["rows"]
    bad = [r for r in rows if not r["ok"]]
    bad_default = [r for r in bad if r["default"]]
    lines = [f"# Triton kernel resources, compiled ahead of time ({report['mode']} launches)", "",
             markdown_line(report), "",
             f"{len(rows)} launches ({sum(r['default'] for r in rows)} default), {len(bad)} spill or overflow shared "
             f"memory, {len(bad_default)} of them default. Limits per block: "
             + ", ".join(f"sm_{a} {v} bytes" for a, v in report["shared_limits"].items())
             + ". registers and spill bytes are per thread (cuobjdump REG, STACK); shared is the dynamic "
             "shared memory the launch requests.", "",
             "| kernel | arch | config | default | warps / stages | registers | spill bytes | shared bytes | "
             "compile s | ok? |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = (f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['compile_s']:.1f}"
                 if "error" not in r else f"did not compile: {r['error']} | | |")
        lines.append(f"| {r['kernel']} | {r['arch']} | {_config_text(r['config'])} | {'yes' if r['default'] else ''} | "
                     f"{r['num_warps']} / {r['num_stages']} | {cells} | {'ok' if r['ok'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--default-only", action="store_true", help="only the launches of the shipped presets")
    which.add_argument("--minimal", action="store_true",
                       help="per kernel, arch and dtype the largest default launch (the default test's set)")
    parser.add_argument("--json", type=Path, default=None,
                        help="results JSON (Markdown beside it); default benchmarks/results/triton_resources*.json")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile processes")
    args = parser.parse_args(argv)
    prov = provenance(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled; unset it")
    mode = "minimal" if args.minimal else "default" if args.default_only else "all"
    path = args.json or RESULTS / ("triton_resources.json" if mode == "all" else f"triton_resources-{mode}.json")
    from ltrain.kernels.aot import SHARED_LIMITS
    with tempfile.TemporaryDirectory() as cache:
        # A fresh cache: every row is a real compile, so compile_s means what it says.
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = run(select(mode), args.jobs)
    report = {**finish(prov), "mode": mode, "shared_limits": {str(a): v for a, v in SHARED_LIMITS.items()},
              "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    failed = [r for r in main()["rows"] if r["default"] and not r["ok"]]
    for r in failed:
        print(f"default launch not ok: {r['kernel']} {r['arch']} {_config_text(r['config'])}: "
              + (r["error"] if "error" in r else f"{r['spill_bytes']} spill bytes, {r['shared_bytes']} shared bytes "
                 f"(limit {r['shared_limit']})"), file=sys.stderr)
    sys.exit(1 if failed else 0)
