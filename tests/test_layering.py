"""The import rules of docs/architecture.md#what-each-layer-may-import, checked on the source: kernels/ needs only torch
and triton (it runs on GPU boxes without the rest), parallel/ never reaches into ltrain/
beyond ltrain.kernels."""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((REPO / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_only_torch_and_triton(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] not in STDLIB | {"torch", "triton"}}
    assert not bad, f"kernels/{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((REPO / "parallel").glob("*.py")), ids=lambda p: p.name)
def test_parallel_imports_no_ltrain_beyond_kernels(path):
    bad = {m for m in imported_modules(path)
           if m.split(".")[0] == "ltrain" and not m.startswith("ltrain.kernels")}
    assert not bad, f"parallel/{path.name} imports {sorted(bad)}"


def package_of(path: Path) -> str:
    """The import-graph node of a source file: ltrain.<module> for ltrain/<module>.py,
    ltrain.<package> for a file inside ltrain/<package>/, ltrain.kernels / ltrain.parallel."""
    rel = path.relative_to(REPO)
    if rel.parts[0] in ("kernels", "parallel"):
        return f"ltrain.{rel.parts[0]}"
    return "ltrain." + (rel.parts[1] if len(rel.parts) > 2 else rel.stem)


SOURCES = [*(REPO / "ltrain").rglob("*.py"), *(REPO / "kernels").glob("*.py"), *(REPO / "parallel").glob("*.py")]


def module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = ["ltrain", *rel.parts] if rel.parts[0] in ("kernels", "parallel") else list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute_imports(path: Path) -> set[str]:
    """Modules a file imports, relative imports resolved, names of `from X import name` included
    (a name may be a submodule: `from ltrain.data import memmap`)."""
    package = module_of(path) if path.name == "__init__.py" else module_of(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(level: str) -> dict[str, set[str]]:
    """level "package": nodes ltrain.<first part>; "module": every module of the repository."""
    modules = {module_of(p) for p in SOURCES}
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        node = package_of(path) if level == "package" else module_of(path)
        for name in absolute_imports(path):
            if name.split(".")[0] != "ltrain":
                continue
            target = ".".join(name.split(".")[:2]) if level == "package" else name
            if level == "module" and target not in modules:
                continue  # a class or function imported by name
            if target not in (node, "ltrain"):
                graph.setdefault(node, set()).add(target)
        graph.setdefault(node, set())
    return graph


@pytest.mark.parametrize("level", ["package", "module"])
def test_no_import_cycles(level):
    """Cycles (models <-> attention between packages, data.config <-> data.memmap between
    modules) make a module impossible to read, test or import alone; lazy imports inside
    functions count. A package's __init__ importing its own modules is not a cycle."""
    graph = import_graph(level)
    if level == "module":
        graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_the_layers():
    """The cycle check above can fail: it sees the edges the layering relies on."""
    graph = import_graph("package")
    assert "ltrain.attention" in graph["ltrain.models"] and "ltrain.nn" in graph["ltrain.attention"]
    assert "ltrain.kernels" in graph["ltrain.parallel"]
    modules = import_graph("module")
    assert "ltrain.data.config" in modules["ltrain.data.memmap"]
    assert "ltrain.parallel.comm" in modules["ltrain.parallel.sharding"]  # `from . import comm`


def test_config_imports_no_model_code():
    """ltrain.config assembles the schema from the kinds' registered sections and runs
    their validators, but loading it loads no kernel, collective, model or Triton
    (the kinds import those where they run them), nor Hydra (a GPU image without it
    builds models from these dataclasses), and it names no kind."""
    import subprocess

    code = ("import sys, ltrain.config; print(' '.join(m for m in sys.modules if m.split('.')[0] in "
            "('triton', 'deepspeed', 'megatron', 'hydra', 'omegaconf', 'wandb') or m.startswith(('ltrain.kernels', 'ltrain.parallel', "
            "'ltrain.models', 'ltrain.attention.context_parallel'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], loaded
    from ltrain.attention.registry import kinds

    source = (REPO / "ltrain" / "config.py").read_text()
    for name in kinds():  # its section, or a test of a layer's kind ("linear" is also a rope_scaling value)
        for mention in (f"attention.{name}", f".{name}.", f'"{name}" in', f'== "{name}"', f".{name})"):
            assert mention not in source, mention
