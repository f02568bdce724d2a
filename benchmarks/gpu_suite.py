"""One-shot GPU suite: compiled Triton kernels against their references, kernel timings against
SDPA, and short bf16 training runs of the small model, in under 8 minutes on one H100 / H200.

    bash benchmarks/gpu_suite.sh                                  # all sections, ~7 min
    bash benchmarks/gpu_suite.sh --sections kernels,bench         # a subset
    bash benchmarks/gpu_suite.sh --max-seq-len 32768              # cap every sequence length
    bash benchmarks/gpu_suite.sh --cases "infllm_v2 D128,N131072" # only cases whose name has one
    bash benchmarks/gpu_suite.sh --dry-run --out /tmp/suite       # CPU rehearsal: tiny shapes, minutes
    python benchmarks/gpu_suite.py ...                            # the same without the wrapper

Sections (each its own time budget, --budgets kernels=110,bench=140,train=120 seconds):

    kernels  benchmarks/gpu_kernels.py `check_cases`: block_sparse_attention with S2 and causal
             layouts, the token-layout path through infllm_v2_attention, lightning_attention;
             forward and gradients, bf16 and fp32; impl="triton" (compiled) and impl="torch"
             each against a plain fp32 reference (masked SDPA, the token recurrence). Max and
             relative errors; pass iff Triton's relative error is within max(2 x the PyTorch
             path's, a floor per dtype).
    bench    benchmarks/gpu_kernels.py `bench_cases`: S2, InfLLM-V2 (sparse mode) and lightning
             against SDPA's flash path at 8K..128K tokens, forward and forward+backward, CUDA
             events (median), peak memory.
    train    benchmarks/gpu_train.py: 30 bf16 steps (autocast, fp32 AdamW) of conf/model/small.yaml
             at 16K tokens per kind (dense, s2, infllm_v2, linear, mixed) with a plain torch loop on
             one fixed random batch: tokens/s, loss first/last, peak memory.

Results: <out>/gpu_suite-<gpu>.json and .md (default out benchmarks/results/, <gpu> the device
name in lower case, e.g. nvidia-h200; "cpu" for a dry run) with benchmarks/provenance.py's keys
(command, commit: "unknown" outside git, machine) and every row's timings. They are rewritten
after each section, so a run cut short keeps what it measured. Exit status 0 iff every
requested section passed, 1 otherwise, 2 for bad arguments or a machine that cannot run it.

Isolation: the parent imports every GPU-path module first (`preflight`: one line per module the
image cannot import), then runs each section in a forked child with a hard deadline (its budget
+ GRACE_S). A case that crashes the child or loses the CUDA context (a faulting kernel) is
recorded as an error and the section resumes after it in a fresh child. The parent never
touches CUDA, which would break CUDA in forked children; should one of its imports do so anyway,
the probe child finds out and the children are spawned instead (--start-method spawn forces it).

--dry-run runs everything on the CPU at tiny shapes (Triton kernels under TRITON_INTERPRET=1)
and says in one line per part what it leaves out because it needs CUDA (compiled kernels, CUDA
event timings, peak memory, SDPA's flash backend, bf16 autocast). The package need not be installed: `install_package_dirs` maps ltrain.kernels,
ltrain.parallel, ltrain.conf to their folders as pyproject.toml's package-dir does. The GPU
path imports only torch, triton and the standard library (no deepspeed, hydra, omegaconf,
wandb, megatron; the train section needs numpy while ltrain.config imports ltrain.data.memmap),
tested by tests/benchmarks/test_gpu_suite.py.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.util
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SECTIONS = {"kernels": ("benchmarks.gpu_kernels", "check_cases"),
            "bench": ("benchmarks.gpu_kernels", "bench_cases"),
            "train": ("benchmarks.gpu_train", "train_cases")}
BUDGETS_S = {"kernels": 110, "bench": 140, "train": 120}
GRACE_S = 20  # past a section's budget before its child is killed (a case runs to its end)
CUDA_LOST = 3  # a child's exit status after a case broke the CUDA context
MIN_CAPABILITY = (8, 0)  # bf16 tensor cores; the kernels' oldest target


def gpu_path_modules() -> list[str]:
    """Every module a GPU run may import: the sections, all of kernels/, the config and model, and
    the collectives the attention layers import when they run."""
    kernels = [f"ltrain.kernels.{p.stem}" for p in sorted((REPO / "kernels").glob("*.py")) if p.stem != "__init__"]
    # torch._dynamo: torch.optim's first optimizer imports it (seconds), once here for every child.
    return ["benchmarks.provenance", *dict.fromkeys(module for module, _ in SECTIONS.values()), *kernels,
            "ltrain.config", "ltrain.models.transformer", "ltrain.attention.context_parallel", "ltrain.parallel.lasp2",
            "torch._dynamo"]


def preflight() -> dict[str, str]:
    """Import gpu_path_modules() here, once (the forked children share them): {module: "ok" or the
    error}, so a dependency the image lacks shows in one line before any section starts."""
    found = {}
    for module in gpu_path_modules():
        try:
            importlib.import_module(module)
            found[module] = "ok"
        except Exception as exc:
            found[module] = _error_text(exc)
            print(f"gpu_suite: preflight: cannot import {module}: {found[module]}; the cases that need it will fail",
                  flush=True)
    return found


# ---- running from a plain checkout --------------------------------------------------------

def package_dirs(pyproject: Path = REPO / "pyproject.toml") -> dict[str, Path]:
    """[tool.setuptools] package-dir of pyproject.toml, {"ltrain.kernels": REPO/"kernels", ...}.
    Read with a regex: tomllib is Python 3.11+."""
    line = re.search(r"^package-dir\s*=\s*\{(.*)\}\s*$", pyproject.read_text(), re.M)
    if line is None:
        raise ValueError(f"{pyproject}: no `package-dir = {{...}}` line under [tool.setuptools]")
    return {name: pyproject.parent / folder for name, folder in re.findall(r'"([\w.]+)"\s*=\s*"([^"]+)"', line[1])}


class PackageDirFinder(importlib.abc.MetaPathFinder):
    """Finds the packages of a package-dir mapping in their folders; their submodules follow
    through the package's __path__."""

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs

    def find_spec(self, name, path=None, target=None):
        folder = self.dirs.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def install_package_dirs() -> None:
    """Make `benchmarks.*` and `ltrain.*` (with ltrain.kernels -> kernels/ etc.) import from this
    checkout, installed or not."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if not any(type(f).__name__ == "PackageDirFinder" for f in sys.meta_path):  # also as __main__'s copy
        sys.meta_path.insert(0, PackageDirFinder(package_dirs()))


# ---- what the sections share ----------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    dry_run: bool
    device: str  # "cuda", or "cpu" for a dry run
    max_seq_len: int
    steps: int  # training steps per run
    cases: tuple[str, ...] = ()  # run only the cases whose name contains one of these; () all


def read_yaml(path: Path) -> dict:
    """The YAML of conf/ (flat `key: scalar` lines and one level of `section:` nesting, comments)
    without PyYAML, which the GPU image lacks. Anything else is a ValueError naming the line."""
    out: dict = {}
    section = None
    for num, raw in enumerate(path.read_text().splitlines(), 1):
        line = re.sub(r"\s+#.*$|^#.*$", "", raw).rstrip()
        if not line.strip():
            continue
        m = re.fullmatch(r"( *)([\w.-]+):(?: +(.*))?", line)
        if m is None or (m[1] and section is None) or len(m[1]) not in (0, 2):
            raise ValueError(f"{path}:{num}: not a `key: value` line of one nesting level: {raw!r}")
        key, value = m[2], m[3]
        if not m[1]:
            section = key if value is None else None
            out[key] = {} if value is None else _scalar(value)
        else:
            out[section][key] = _scalar(value or "")
    return out


def _scalar(text: str):
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~", ""):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


def conf(path: str) -> dict:
    return read_yaml(REPO / "conf" / path)


# ---- a section's cases, in a child process --------------------------------------------------

def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def _cuda_alive() -> bool:
    import torch

    try:
        torch.cuda.synchronize()
        return True
    except RuntimeError:
        return False


class Section:
    """What a section's cases may ask of the runner: record a skipped part, the time left."""

    def __init__(self, name: str, deadline: float):
        self.name, self.deadline, self.skipped = name, deadline, []

    def skip(self, message: str) -> None:
        """One line per CUDA-only part a dry run leaves out (printed once)."""
        if message not in self.skipped:
            self.skipped.append(message)
            print(f"skip: {self.name}: {message}", flush=True)

    def time_left(self) -> float:
        return self.deadline - time.time()


def _child(name: str, settings: Settings, first: int, deadline: float, part: Path) -> None:
    """Run cases first.. of section `name`; after each, write {"cases", "rows", "skipped"} to part."""
    install_package_dirs()  # a spawned child starts without the parent's finders
    section = Section(name, deadline)
    state = {"cases": None, "rows": [], "skipped": section.skipped, "error": None}
    try:
        module, fn = SECTIONS[name]
        cases = getattr(importlib.import_module(module), fn)(settings, section)
    except Exception as exc:  # an import or set-up error loses this section only
        state["error"] = _error_text(exc)
        _write_json(part, state)
        print(f"{name}: set-up failed: {state['error']}", flush=True)
        os._exit(1)
    if settings.cases:
        cases = [(case, run) for case, run in cases if any(s in case for s in settings.cases)]
    state["cases"] = [case for case, _ in cases]
    _write_json(part, state)
    for case, run in cases[first:]:
        if section.time_left() <= 0:
            state["rows"].append({"case": case, "status": "skipped", "why": "section budget spent"})
            _write_json(part, state)
            continue
        start = time.perf_counter()
        try:
            row = {"case": case, **run()}
        except Exception as exc:
            row = {"case": case, "status": "error", "error": _error_text(exc)}
        row["wall_s"] = round(time.perf_counter() - start, 2)
        state["rows"].append(row)
        _write_json(part, state)
        print(f"{name}: {case}: {row['status']} ({row['wall_s']:.1f} s)" +
              (f" {row['error']}" if row["status"] == "error" else ""), flush=True)
        if row["status"] == "error" and settings.device == "cuda" and not _cuda_alive():
            os._exit(CUDA_LOST)
    os._exit(0)


def _error_text(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-2:]
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (at {where})"


def _start(method: str, target, args, timeout: float) -> tuple[int | None, bool]:
    """Run target(*args) in a child started by `method` (fork, spawn); (exit code, killed at the timeout)."""
    proc = multiprocessing.get_context(method).Process(target=target, args=args)
    proc.start()
    proc.join(max(timeout, 1.0))
    killed = proc.is_alive()
    if killed:
        proc.kill()
        proc.join()
    return proc.exitcode, killed


def run_section(name: str, settings: Settings, budget_s: float, tmp: Path, method: str = "fork") -> dict:
    """Every case of a section, resuming in a new child after one that crashed it."""
    start = time.time()
    deadline = start + budget_s
    result = {"status": None, "budget_s": budget_s, "rows": [], "skipped": [], "errors": []}
    cases, first, attempt = None, 0, 0
    while True:
        part = tmp / f"{name}-{attempt}.json"
        code, killed = _start(method, _child, (name, settings, first, deadline, part),
                              deadline + GRACE_S - time.time())
        state = json.loads(part.read_text()) if part.exists() else {"cases": None, "rows": [], "skipped": []}
        cases = state["cases"] or cases
        result["rows"] += state["rows"]
        result["skipped"] += [s for s in state["skipped"] if s not in result["skipped"]]
        first += len(state["rows"])
        if state.get("error") or cases is None:
            result["errors"].append(f"set-up: {state.get('error') or f'the child exited with {code}'}")
            break
        if code == 0 or first >= len(cases):
            break
        why = (f"killed at the section's budget + {GRACE_S} s" if killed else
               f"the child exited with {code}" + (" (CUDA context lost)" if code == CUDA_LOST else ""))
        if code != CUDA_LOST or killed:  # the child died inside cases[first] without recording it
            result["rows"].append({"case": cases[first], "status": "error", "error": why})
            first += 1
        result["errors"].append(f"{cases[first - 1]}: {why}")
        if killed:
            result["rows"] += [{"case": c, "status": "skipped", "why": "section killed"} for c in cases[first:]]
        if killed or first >= len(cases):
            break
        attempt += 1
    result["wall_s"] = round(time.time() - start, 1)
    statuses = {r["status"] for r in result["rows"]}
    result["status"] = ("error" if result["errors"] and not result["rows"] else
                        "fail" if statuses & {"fail", "error"} else
                        "incomplete" if "skipped" in statuses else "pass")
    return result


# ---- the parent ---------------------------------------------------------------------------

def _probe(settings: Settings, argv: list[str] | None, out: Path) -> None:
    """In a child: the machine as benchmarks/provenance.py records it, and the accelerator; or
    {"error": ...} when CUDA does not start (e.g. in a fork of a process that touched it)."""
    install_package_dirs()
    try:
        import torch
        import triton

        from benchmarks.provenance import provenance

        info = {"provenance": provenance(argv, str(Path(__file__).resolve())), "torch": torch.__version__,
                "triton": triton.__version__, "python": sys.version.split()[0], "cuda": torch.version.cuda,
                "gpu": None, "capability": None, "numpy": importlib.util.find_spec("numpy") is not None}
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = list(torch.cuda.get_device_capability(0))
    except Exception as exc:
        info = {"error": _error_text(exc)}
    _write_json(out, info)
    os._exit(0)


def probe(settings: Settings, argv: list[str] | None, tmp: Path, method: str) -> tuple[dict, str]:
    """(the probe's report, the start method that works): fork, unless this process's imports
    touched CUDA so that a forked child cannot start it, then spawn."""
    for attempt in (method, "spawn"):
        out = tmp / f"probe-{attempt}.json"
        _start(attempt, _probe, (settings, argv, out), 300)
        info = json.loads(out.read_text()) if out.exists() else {"error": "the probe child died; see above"}
        if attempt == "spawn" or "forked subprocess" not in info.get("error", ""):
            return info, attempt
        print(f"gpu_suite: {info['error']}: an import initialised CUDA in this process; the children are "
              "spawned instead of forked", flush=True)


def gpu_tag(gpu: str | None) -> str:
    """File-name form of a device name: "NVIDIA H200" -> "nvidia-h200"; None (dry run) -> "cpu"."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if gpu else "cpu"


def _budgets(text: str) -> dict[str, float]:
    budgets = dict(BUDGETS_S)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in SECTIONS or not re.fullmatch(r"\d+(\.\d*)?", value):
            raise argparse.ArgumentTypeError(f"{item!r}: give SECTION=SECONDS with SECTION one of "
                                             f"{', '.join(SECTIONS)}")
        budgets[key] = float(value)
    return budgets


def _sections(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section {', '.join(map(repr, unknown)) or '(none)'}; "
                                         f"allowed: {', '.join(SECTIONS)} (comma-separated)")
    return list(dict.fromkeys(names))


def _max_seq_len(text: str) -> int:
    if not text.isdigit() or int(text) < 1024 or int(text) % 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a multiple of 1024, at least 1024 "
                                         "(every block size and InfLLM-V2 stride divides it)")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_suite", description=__doc__.splitlines()[0],
                                epilog="See the module docstring (benchmarks/gpu_suite.py) for each section.")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter; skips CUDA-only parts")
    p.add_argument("--sections", type=_sections, default=list(SECTIONS), help="comma-separated: kernels,bench,train")
    p.add_argument("--max-seq-len", type=_max_seq_len, default=131072, help="longest sequence of any section")
    p.add_argument("--cases", type=lambda s: tuple(filter(None, s.split(","))), default=(),
                   help="run only the cases whose name contains one of these comma-separated strings, "
                        "e.g. 'infllm_v2 D128,N131072'")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; dry run 3)")
    p.add_argument("--budgets", type=_budgets, default=dict(BUDGETS_S),
                   help="seconds per section, e.g. kernels=110,bench=140,train=120")
    p.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                   help="how section children start: fork (default: they share the parent's imports) or spawn "
                        "(fresh interpreters; chosen anyway when forked children cannot start CUDA)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.dry_run else 30
    if args.steps < 2:
        p.error(f"--steps={args.steps}: need at least 2 (the first step compiles and is not timed)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before any kernel module is imported: triton.jit picks interpreter or compiler then.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() then keeps fork usable
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.pop("TRITON_INTERPRET", None) == "1":
        print("gpu_suite: unset TRITON_INTERPRET=1: the suite runs compiled kernels", flush=True)
    install_package_dirs()
    imports = preflight()  # no CUDA call in this process: a forked child could not initialise it then
    from benchmarks.provenance import finish

    settings = Settings(dry_run=args.dry_run, device="cpu" if args.dry_run else "cuda",
                        max_seq_len=args.max_seq_len, steps=args.steps, cases=args.cases)
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as tmp:
        info, method = probe(settings, argv, Path(tmp), args.start_method)
        if "error" in info:
            print(f"gpu_suite: error: torch, triton or the device do not start: {info['error']}")
            return 2
        if not args.dry_run:
            if info["gpu"] is None:
                print("gpu_suite: error: no CUDA device; on a CPU machine run with --dry-run")
                return 2
            if tuple(info["capability"]) < MIN_CAPABILITY:
                print(f"gpu_suite: error: {info['gpu']} is sm_{''.join(map(str, info['capability']))}; "
                      f"the kernels need sm_{''.join(map(str, MIN_CAPABILITY))} or newer")
                return 2
        gpu = None if args.dry_run else info["gpu"]
        report = {**info.pop("provenance"), "suite": {
            **asdict(settings), **info, "gpu": gpu,
            "triton_mode": "interpreter (TRITON_INTERPRET=1)" if args.dry_run else "compiled",
            "sections": args.sections, "budgets_s": {s: args.budgets[s] for s in args.sections},
            "imports": imports, "start_method": method},
            "sections": {}}
        args.out.mkdir(parents=True, exist_ok=True)
        paths = [args.out / f"gpu_suite-{gpu_tag(gpu)}.{ext}" for ext in ("json", "md")]
        print(f"gpu_suite: {gpu or 'CPU dry run'}, sections {','.join(args.sections)}, writing {paths[0]}", flush=True)
        for name in args.sections:
            report["sections"][name] = run_section(name, settings, args.budgets[name], Path(tmp), method)
            report["passed"] = all(s["status"] == "pass" for s in report["sections"].values())
            _write_json(paths[0], report)
            paths[1].write_text(markdown(report))
            print(f"gpu_suite: {name}: {report['sections'][name]['status']} "
                  f"in {report['sections'][name]['wall_s']:.0f} s", flush=True)
    finish(report)
    _write_json(paths[0], report)
    paths[1].write_text(markdown(report))
    print(f"gpu_suite: {'passed' if report['passed'] else 'FAILED'}; wrote {paths[0]} and {paths[1]}")
    return 0 if report["passed"] else 1


# ---- Markdown ----------------------------------------------------------------------------

def _num(x, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _unfinished_row(r: dict, empty_cells: int, fill: str) -> str:
    """A case that was skipped or errored: its name, empty cells, then why."""
    return f"| {r['case']} |" + f" {fill} |" * empty_cells + f" {r['status']}: {r.get('error') or r.get('why', '')} |"


def _kernels_md(rows: list[dict]) -> list[str]:
    lines = ["| case | shape | max abs err (Triton) | worst rel err Triton / torch (tensor) | result |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "errors" not in r:
            lines.append(_unfinished_row(r, 3, "-"))
            continue
        abs_err = ", ".join(f"{t} {e['max_abs']:.2e}" for t, e in r["errors"].items())
        worst = max(r["errors"], key=lambda t: r["errors"][t]["rel"] / r["errors"][t]["allowed"])
        e = r["errors"][worst]
        select = f", selections differ in {r['select_mismatch']:.2%}" if "select_mismatch" in r else ""
        lines.append(f"| {r['case']} | {r['shape']} | {abs_err} | {e['rel']:.2e} / {e['rel_torch']:.2e} "
                     f"(allowed {e['allowed']:.1e}, {worst}) | {r['status']}{select} |")
    return lines


def _bench_md(rows: list[dict]) -> list[str]:
    sdpa = {(r["seq_len"], p): r[p + "_ms"] for r in rows if r.get("method") == "sdpa"
            for p in ("fwd", "fwd_bwd") if r.get(p + "_ms")}
    lines = ["| method | tokens | fwd ms | fwd+bwd ms | speed-up vs SDPA fwd / fwd+bwd | attended | "
             "fwd TFLOP/s | peak GiB | result |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "method" not in r:
            lines.append(_unfinished_row(r, 7, ""))
            continue
        speed = " / ".join(_num(sdpa[(r["seq_len"], p)] / r[p + "_ms"], ".2f") + "x"
                           if r.get(p + "_ms") and (r["seq_len"], p) in sdpa else "-" for p in ("fwd", "fwd_bwd"))
        fwd, fwd_bwd = ((_num(r[p + "_ms"], ".2f") if r["fwd_ms"] is not None else "not measured")
                        for p in ("fwd", "fwd_bwd"))
        lines.append(f"| {r['method']} ({r['ran']}) | {r['seq_len']} | {fwd} | {fwd_bwd} | {speed} | "
                     f"{_num(r['attended'], '.3f')} | {_num(r['fwd_tflops'], '.1f')} | {_num(r['peak_gib'], '.2f')} | "
                     f"{r['status']} |")
    return lines


def _train_md(rows: list[dict]) -> list[str]:
    lines = ["| run | pattern | tokens/step | steps | tokens/s | loss first -> last | peak GiB | modes | result |",
             "|---|---|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        if "pattern" not in r:
            lines.append(_unfinished_row(r, 7, ""))
            continue
        lines.append(f"| {r['case']} | {r['pattern']} | {r['tokens_per_step']} | {r['steps']} | "
                     f"{_num(r['tokens_per_s'], ',.0f')} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | "
                     f"{_num(r['peak_gib'], '.2f')} | {r['modes']} | {r['status']} |")
    return lines


TABLES = {"kernels": _kernels_md, "bench": _bench_md, "train": _train_md}
TITLES = {"kernels": "Triton kernels against fp32 references", "bench": "Kernel timings against SDPA",
          "train": "training runs per attention kind (small model, bf16, on a GPU)"}


def markdown(report: dict) -> str:
    from benchmarks.provenance import markdown_line

    s = report["suite"]
    where = (s["gpu"] + f" (sm_{''.join(map(str, s['capability']))})" if s["gpu"] else
             "CPU dry run (tiny shapes; GPU numbers not measured (no GPU): run `bash benchmarks/gpu_suite.sh` "
             "on a machine with one H100/H200)")
    lines = [f"# GPU suite: {where}", "", markdown_line(report), "",
             f"torch {s['torch']}, triton {s['triton']} ({s['triton_mode']}), CUDA {s['cuda']}, Python {s['python']}; "
             f"max sequence length {s['max_seq_len']}; result: {'pass' if report.get('passed') else 'FAIL'}.", ""]
    failed = {m: e for m, e in s["imports"].items() if e != "ok"}
    lines += [f"- preflight: cannot import {m}: {e}" for m, e in failed.items()] + ([""] if failed else [])
    for name, sec in report["sections"].items():
        lines += [f"## {name}: {TITLES[name]}", "",
                  f"{sec['status']} in {sec['wall_s']:.0f} s (budget {sec['budget_s']:.0f} s).", ""]
        lines += [f"- skipped: {m}" for m in sec["skipped"]] + [f"- error: {e}" for e in sec["errors"]]
        if sec["skipped"] or sec["errors"]:
            lines.append("")
        lines += TABLES[name](sec["rows"]) + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
