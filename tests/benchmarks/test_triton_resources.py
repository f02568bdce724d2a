"""benchmarks/triton_resources.py compiles every Triton kernel for sm_80 and sm_90 (no GPU needed):
no default launch may spill registers or ask for more shared memory than the arch gives a block.

Runs the report in a fresh process: the kernels must be imported compiled, and the kernel tests'
conftest sets TRITON_INTERPRET=1 in this one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = {"kernel", "arch", "config", "default", "registers", "spill_bytes", "shared_bytes", "compile_s"}
LIMITS = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def report(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "resources.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.triton_resources", *args, "--json", str(path),
                           "--jobs", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert path.exists(), proc.stderr[-3000:]
    return proc, json.loads(path.read_text()), path.with_suffix(".md").read_text()


def kernel_names():
    """Kernel names of every module's aot_specs, read in a compiled-mode process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from benchmarks.triton_resources import spec_modules, _specs\n"
            "print(sorted({s.kernel for m in spec_modules() for s in _specs(m)}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return set(eval(out.stdout))


def check(proc, result, md):
    rows = result["rows"]
    assert rows and all(KEYS <= set(r) for r in rows)
    bad = [r for r in rows if r["spill_bytes"] != 0 or r["shared_bytes"] > LIMITS[r["arch"]]]
    assert not bad, "\n".join(f"{r['kernel']} {r['arch']} {r['config']}: {r['registers']} registers, "
                              f"{r['spill_bytes']} spill bytes, {r['shared_bytes']} shared bytes" for r in bad)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(r["default"] for r in rows) and all(r["registers"] > 0 for r in rows)
    # Every kernel of every module, on both targets.
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in kernel_names() for a in LIMITS}
    assert result["commit"] and result["machine"]["cores"] and "load_avg_1m_end" in result
    assert "Command: `python -m benchmarks.triton_resources" in md and md.count("| ok |") == len(rows)


def test_largest_default_launch_of_each_kernel_compiles_without_spills(tmp_path):
    proc, result, md = report(tmp_path, "--minimal")
    check(proc, result, md)
    # Per kernel, arch and dtype: the bf16 and fp32 launches at the presets' largest head dim and block.
    assert len(rows := result["rows"]) == len({(r["kernel"], r["arch"], r["config"].get("dtype")) for r in rows})


@pytest.mark.slow
def test_every_default_launch_compiles_without_spills(tmp_path):
    check(*report(tmp_path, "--default-only"))
