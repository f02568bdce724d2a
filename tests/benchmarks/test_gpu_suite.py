"""benchmarks/gpu_suite.sh and .py: arguments, the conf/ and pyproject readers, a section that keeps
going past failing, crashing and hanging cases, and the CPU dry run through the wrapper on a
Python that has the GPU image's limits (no ltrain install; deepspeed, hydra, omegaconf, wandb,
megatron, tokenizers blocked by a meta path finder) writing its results and skip lines."""

import json
import os
import subprocess
import sys
import time
import tomllib

import pytest
import yaml

from benchmarks import gpu_suite as suite

REPO = suite.REPO
BLOCKED = ("deepspeed", "hydra", "omegaconf", "wandb", "megatron", "tokenizers")
# sitecustomize for the child Pythons: the GPU image (no editable ltrain install; BLOCKED absent).
SITECUSTOMIZE = f"""
import importlib.abc, os, sys
BLOCKED = {BLOCKED!r}
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            with open(os.environ["BLOCK_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU image)", name=name)
        return None

sys.meta_path.insert(0, Blocked())
"""


# ---- arguments and readers --------------------------------------------------------------------

def test_defaults_and_options():
    a = suite.parse_args([])
    assert (a.dry_run, a.sections, a.max_seq_len, a.steps, a.cases) == (False, ["kernels", "bench", "train"],
                                                                        131072, 30, ())
    assert sum(a.budgets.values()) + len(a.sections) * suite.GRACE_S < 8 * 60 - 30  # 8 minutes, start-up included
    a = suite.parse_args(["--dry-run", "--sections", "train,kernels,train", "--max-seq-len", "32768",
                          "--budgets", "train=10", "--cases", "s2,N8192"])
    assert (a.sections, a.max_seq_len, a.steps, a.cases) == (["train", "kernels"], 32768, 3, ("s2", "N8192"))
    assert a.budgets == {**suite.BUDGETS_S, "train": 10.0}


@pytest.mark.parametrize("argv, message", [
    (["--sections", "kernels,gpu"], "unknown section 'gpu'; allowed: kernels, bench, train"),
    (["--max-seq-len", "5000"], "'5000': must be a multiple of 1024"),
    (["--budgets", "train:10"], "give SECTION=SECONDS"),
    (["--steps", "1"], "--steps=1: need at least 2"),
])
def test_bad_arguments_fail_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        suite.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_read_yaml_matches_pyyaml_on_the_presets_it_reads():
    presets = [*sorted((REPO / "conf" / "model").glob("*.yaml")), *sorted((REPO / "conf" / "attention").glob("*.yaml"))]
    for path in [*presets, REPO / "conf" / "optim" / "adamw.yaml"]:
        assert suite.read_yaml(path) == yaml.safe_load(path.read_text()), path
    with pytest.raises(ValueError, match=r"train.yaml:\d+: not a `key: value` line"):
        suite.read_yaml(REPO / "conf" / "train.yaml")  # lists: not the presets' subset


def test_package_dirs_are_pyprojects():
    with open(REPO / "pyproject.toml", "rb") as f:
        want = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    assert suite.package_dirs() == {name: REPO / folder for name, folder in want.items()}
    assert suite.gpu_tag("NVIDIA H200") == "nvidia-h200" and suite.gpu_tag(None) == "cpu"


# ---- a section outlives its cases --------------------------------------------------------------

def failing_cases(settings, section):
    def crash():
        os._exit(7)  # what a segfaulting kernel does to the child

    def hang():
        time.sleep(60)

    def broken():
        raise ValueError("a bug in one case")

    section.skip("a skipped part")
    cases = [("ok", lambda: {"status": "pass"}), ("raises", broken), ("crashes", crash),
             ("after crash", lambda: {"status": "pass"}), ("hangs", hang), ("never", lambda: {"status": "pass"})]
    return cases if settings.steps == 3 else cases[:4]


def test_a_section_records_errors_and_crashes_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(suite.SECTIONS, "failing", (__name__, "failing_cases"))
    settings = suite.Settings(dry_run=True, device="cpu", max_seq_len=1024, steps=2)
    result = suite.run_section("failing", settings, 60, tmp_path)
    assert [(r["case"], r["status"]) for r in result["rows"]] == [
        ("ok", "pass"), ("raises", "error"), ("crashes", "error"), ("after crash", "pass")]
    assert "ValueError: a bug in one case" in result["rows"][1]["error"]
    assert result["errors"] == ["crashes: the child exited with 7"]
    assert result["skipped"] == ["a skipped part"] and result["status"] == "fail"


def test_a_hanging_case_is_killed_at_the_budget(tmp_path, monkeypatch):
    monkeypatch.setitem(suite.SECTIONS, "failing", (__name__, "failing_cases"))
    monkeypatch.setattr(suite, "GRACE_S", 1)
    settings = suite.Settings(dry_run=True, device="cpu", max_seq_len=1024, steps=3,
                              cases=("ok", "crashes", "after", "hangs", "never"))
    start = time.time()
    result = suite.run_section("failing", settings, 3, tmp_path)
    assert time.time() - start < 20
    assert [(r["case"], r["status"]) for r in result["rows"]] == [
        ("ok", "pass"), ("crashes", "error"), ("after crash", "pass"), ("hangs", "error"), ("never", "skipped")]
    assert result["errors"] == ["crashes: the child exited with 7", "hangs: killed at the section's budget + 1 s"]
    assert result["status"] == "fail"


# ---- the dry run, as on the GPU image ----------------------------------------------------------

def _gpu_image_env(tmp_path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return {**env, "PYTHONPATH": str(site), "BLOCK_LOG": str(tmp_path / "blocked.log"), "PYTHON": sys.executable}


def test_dry_run_on_the_gpu_image(tmp_path):
    env = _gpu_image_env(tmp_path)
    # The image has no ltrain install: without the suite's mapping ltrain.kernels does not import.
    bare = subprocess.run([sys.executable, "-c", "import ltrain.kernels"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert "No module named 'ltrain.kernels'" in bare.stderr
    # One case per section through the wrapper (the slow test runs all of them).
    out = tmp_path / "out"
    run = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", "--out", str(out), "--steps", "2",
                          "--cases", "causal D32 float32,sdpa N128,linear"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Every GPU-path module imported (preflight), none of BLOCKED among their imports.
    assert not (tmp_path / "blocked.log").exists()
    skips = [line for line in run.stdout.splitlines() if line.startswith("skip: ")]
    assert skips == [
        "skip: kernels: compiled Triton kernels need a GPU: the kernels ran in the interpreter (TRITON_INTERPRET=1) "
        "at tiny shapes",
        "skip: bench: SDPA's flash backend needs CUDA: the default SDPA backend stood in",
        "skip: bench: timings: CUDA events need a GPU; each method ran forward and forward+backward once, untimed",
        "skip: bench: peak memory: torch.cuda memory statistics need a GPU",
        "skip: train: peak memory: torch.cuda memory statistics need a GPU",
        "skip: train: bf16 autocast: the dry run trains in fp32 (CPU autocast is not the GPU's mixed precision)"]
    report = json.loads((out / "gpu_suite-cpu.json").read_text())
    assert {"command", "commit", "uncommitted", "machine", "started_at", "finished_at"} <= set(report)
    assert report["command"].startswith("python benchmarks/gpu_suite.py --dry-run")
    assert report["passed"] and report["suite"]["gpu"] is None and report["suite"]["dry_run"]
    assert report["suite"]["start_method"] == "fork"
    imports = report["suite"]["imports"]
    assert {"ltrain.kernels.lightning_triton", "ltrain.kernels.infllm_v2_triton", "ltrain.config",
            "benchmarks.gpu_train"} <= set(imports) and set(imports.values()) == {"ok"}
    rows = {name: sec["rows"] for name, sec in report["sections"].items()}
    assert [r["case"] for r in rows["kernels"]] == ["causal D32 float32"]
    assert set(rows["kernels"][0]["errors"]) == {"out", "lse", "dq", "dk", "dv"}
    assert all(e["pass"] and e["rel"] < 1e-4 for e in rows["kernels"][0]["errors"].values())
    assert [(r["case"], r["fwd_ms"]) for r in rows["bench"]] == [("sdpa N128", None)]
    (train,) = rows["train"]
    assert train["case"] == "linear" and train["steps"] == 2 and train["loss_last"] < train["loss_first"]
    md = (out / "gpu_suite-cpu.md").read_text()
    for text in ("# GPU suite: CPU dry run", "not measured (no GPU)", report["command"], "## kernels", "## bench",
                 "## train", "- skipped: peak memory", "| causal D32 float32 |",
                 "| sdpa (default backend) | 128 | not measured |",
                 "| linear | L | 256 | 2 |"):
        assert text in md, text


@pytest.mark.slow
def test_full_dry_run(tmp_path):
    out = tmp_path / "out"
    # Budgets for a loaded 2-core machine: the interpreter needs minutes there.
    run = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", "--start-method", "spawn", "--out", str(out),
                          "--budgets", "kernels=600,bench=300,train=300"], cwd=REPO,
                         env=_gpu_image_env(tmp_path), capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "gpu_suite-cpu.json").read_text())
    counts = {name: len(sec["rows"]) for name, sec in report["sections"].items()}
    assert counts == {"kernels": 8, "bench": 4, "train": 5}
    assert report["suite"]["start_method"] == "spawn"
    assert all(r["status"] in ("pass", "ok") for sec in report["sections"].values() for r in sec["rows"])
