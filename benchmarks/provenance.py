"""Where a benchmark result came from: the one place benchmarks/ records it.

Every results JSON in benchmarks/results/ carries these top-level keys, and every
results Markdown file one line made from them (`markdown_line`):

    command            the command line as run: `python benchmarks/x.py ARGS` or
                       `python -m benchmarks.x ARGS` (from the repository root)
    commit             `git rev-parse --short HEAD`, plus "-dirty" when tracked files
                       have uncommitted changes (git describe --dirty's rule)
    uncommitted        the paths `git status --porcelain` lists: those files, and new files
                       git does not ignore; [] when clean. Files under benchmarks/results/
                       (outputs, not code) count for neither.
    machine            cpu model, arch, cores, memory_gib, torch version, gpu (name and
                       count when CUDA is available, else null)
    started_at         UTC time at the start, ISO 8601
    load_avg_1m_start  1-minute load average at the start (the machine may be shared)
    load_avg_1m_end    the same at the end, added by `finish`
    finished_at        UTC time at the end, added by `finish`

    prov = provenance(argv, __file__)   # first thing in main()
    ...                                 # the benchmark
    result = {**finish(prov), ...}
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results/"


def command(argv: list[str] | None = None, script: str | None = None) -> str:
    """`python benchmarks/x.py ARGS` or `python -m benchmarks.x ARGS`, as the benchmark was started.

    `script` is the benchmark's own `__file__`; `argv` its arguments (default sys.argv[1:]).
    Run as `-m`, `__main__` has a module spec; run as a file, it has none. A benchmark
    called as a library (its main(argv) from a test) is written as its `-m` form."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    path = Path(script or main_file or sys.argv[0]).resolve()
    try:
        rel = path.relative_to(REPO)
    except ValueError:
        rel = path
    is_main = main_file is not None and Path(main_file).resolve() == path
    spec = getattr(main, "__spec__", None) if is_main else None
    if is_main and spec is None:
        prog = ["python", rel.as_posix()]
    else:
        prog = ["python", "-m", spec.name if spec else ".".join(rel.with_suffix("").parts)]
    return shlex.join(prog + args)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def git_state() -> tuple[str, list[str]]:
    """(short sha + "-dirty" if tracked files changed, the changed and new files); ("unknown", [])
    outside git."""
    try:
        sha = _git("rev-parse", "--short", "HEAD").strip()
        fields = iter(_git("status", "--porcelain", "-z").split("\0"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", []
    status = []  # (XY, path); -z: paths unquoted, a rename's source follows its entry
    for entry in fields:
        if entry:
            if "R" in entry[:2] or "C" in entry[:2]:
                next(fields, None)
            if not entry[3:].startswith(RESULTS):
                status.append((entry[:2], entry[3:]))
    dirty = any(xy != "??" for xy, _ in status)
    return sha + ("-dirty" if dirty else ""), [path for _, path in status]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict:
    """cpu, arch, cores, memory_gib, torch, gpu ("<name> x <count>" or None)."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return dict(cpu=_cpu_model(), arch=platform.machine(), cores=os.cpu_count(), memory_gib=_memory_gib(),
                torch=torch.__version__, gpu=gpu)


def load_avg_1m() -> float:
    return round(os.getloadavg()[0], 2)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(argv: list[str] | None = None, script: str | None = None) -> dict:
    """The keys of the module docstring known at the start of a benchmark."""
    commit, changed = git_state()
    return dict(command=command(argv, script), commit=commit, uncommitted=changed, machine=machine(),
                started_at=_now(), load_avg_1m_start=load_avg_1m())


def finish(prov: dict) -> dict:
    """`prov` with the end-of-run load average and time added (in place; returned)."""
    prov.update(load_avg_1m_end=load_avg_1m(), finished_at=_now())
    return prov


def machine_text(m: dict) -> str:
    mem = f", {m['memory_gib']:.0f} GiB" if m.get("memory_gib") else ""
    return (f"{m['cpu']} ({m['arch']}), {m['cores']} cores{mem}, torch {m['torch']}, "
            + (f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"))


def markdown_line(prov: dict) -> str:
    """One Markdown line: command, commit, machine, load at start (and end when finished)."""
    end = f", {prov['load_avg_1m_end']:.1f} at the end" if "load_avg_1m_end" in prov else ""
    files = prov.get("uncommitted") or []
    changed = (f" (uncommitted changes to {', '.join(files)})" if 0 < len(files) <= 8 else
               f" (uncommitted changes to {len(files)} files, listed in the JSON)" if files else "")
    return (f"Command: `{prov['command']}` at commit {prov['commit']}{changed}, {prov['started_at']}; "
            f"machine: {machine_text(prov['machine'])}; 1-min load average {prov['load_avg_1m_start']:.1f} "
            f"at the start{end}.")


def write_results(name: str, report: dict, markdown: str) -> Path:
    """benchmarks/results/<name>.json (the report) and <name>.md (`markdown`, printed too); the JSON path."""
    results = REPO / RESULTS
    results.mkdir(exist_ok=True)
    path = results / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown)
    print(markdown)
    return path
