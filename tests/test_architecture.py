"""The shape of the codebase, checked from its source: imports (at any depth) form no cycle and point one way,
backend names live only in the backend registry, and `import deploy.cli` loads no heavy library."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("partialnet", "export", "calibration", "runtimes", "deploy")
# Which packages each may import (STYLE.md: deploy -> {runtimes, calibration, export} -> partialnet).
ALLOWED = {
    "partialnet": set(),
    "runtimes": {"partialnet"},
    "export": {"partialnet", "runtimes"},
    "calibration": {"partialnet", "runtimes", "export"},
    "deploy": {"partialnet", "runtimes", "export", "calibration"},
}
BACKEND_NAMES = ("eager", "onnxruntime", "openvino", "tensorrt")
HEAVY = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "onnxsim", "tensorrt", "dask", "distributed")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `name` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            add(mod)
            for alias in node.names:  # `from . import backends` imports a module
                if f"{mod}.{alias.name}" in known:
                    add(f"{mod}.{alias.name}")
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_counting_imports_inside_functions():
    assert find_cycle(graph()) is None


def test_packages_import_only_downwards():
    bad = []
    for name, targets in graph().items():
        pkg = name.split(".")[0]
        for t in targets:
            other = t.split(".")[0]
            if other != pkg and other not in ALLOWED[pkg]:
                bad.append(f"{name} -> {t}")
    assert bad == []


def test_only_the_backend_registry_compares_backend_names():
    """No `x == "openvino"` (or `in ("onnxruntime", ...)`) outside deploy/backends/: code iterates the registry."""
    offenders = []
    for name, path in modules().items():
        if name.startswith("deploy.backends") or not name.startswith(("deploy", "calibration", "export")):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                consts += [e for c in [node.left, *node.comparators] if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                           for e in c.elts if isinstance(e, ast.Constant)]
                if any(c.value in BACKEND_NAMES for c in consts):
                    offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


def test_importing_the_cli_loads_no_heavy_library():
    code = ("import json, sys; import deploy.cli; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["list", "--json"]])
def test_help_and_list_load_no_heavy_library(argv):
    code = ("import json, sys, contextlib, io\nfrom deploy.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(" + repr(argv) + ")\n    except SystemExit:\n        pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
