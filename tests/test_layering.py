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
