"""The layering of ARCHITECTURE.md, checked from the source: mergekit_rl ← trainers ←
reasoning_demo, and no import cycle between modules. Every import counts, also those inside
functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("mergekit_rl", "trainers", "reasoning_demo")  # each may import only those before it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules of ours that `path` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from pkg import mod` may name a module: count both
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in LAYERS)
    return found


MODULES = {module_name(p): p for layer in LAYERS for p in (REPO / layer).rglob("*.py")}


def edges() -> dict[str, set[str]]:
    out = {}
    for name, path in MODULES.items():
        deps = set()
        for target in imports(path):
            while target and target not in MODULES:  # `pkg.mod.attr` -> `pkg.mod`
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        out[name] = deps
    return out


def test_the_packages_exist_and_are_parsed():
    assert {"mergekit_rl.cli", "trainers.scaffold", "reasoning_demo.demo"} <= set(MODULES)


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down_the_stack(layer):
    allowed = LAYERS[:LAYERS.index(layer) + 1]
    wrong = sorted(f"{name} imports {dep}" for name, deps in edges().items()
                   if name.split(".")[0] == layer for dep in deps
                   if dep.split(".")[0] not in allowed)
    assert not wrong, wrong


def test_no_import_cycles():
    graph = edges()
    # a package's __init__ is imported by its modules implicitly; it must not import them back
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, [" -> ".join(c) for c in cycles]
