"""The project's import graph: no cycle, and layers that only point down.

The graph is built from the source with ``ast`` (every ``import`` statement, also those inside
functions), so a late import that closes a cycle is caught too.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {"tests", ".git", ".ci", "docs", "config"}

# Package → the project packages and modules it may import (besides itself); CONTRIBUTING.md
# draws the same map. utils is the bottom layer.
BLOCKS = {"utils", "model", "dataloader", "losses"}
ALLOWED = {
    "utils": set(),
    "model": {"utils"},
    "dataloader": {"utils"},
    "losses": {"utils"},
    "evaluation": BLOCKS,
    "extraction": BLOCKS,
    "registry": BLOCKS,
    "schemas": BLOCKS | {"registry", "evaluation"},
    "training": BLOCKS | {"registry"},
}


def project_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    modules = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if relative.parts[0] in SKIPPED_DIRS or any(p.startswith(".") for p in relative.parts):
            continue
        name = ".".join(relative.with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` (``a.b.c``) names, or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(p for p in [*parts, base] if p)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            deps.update(t for t in (resolve(target, modules) for target in targets) if t)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_late_and_relative_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("from . import a\n")
    graph = import_graph(project_modules(tmp_path))
    assert "pkg.b" in graph["pkg.a"] and "pkg.a" in graph["pkg.b"]
    assert find_cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(project_modules())


def test_no_import_cycle_among_the_project_modules(graph):
    assert len(graph) > 40, "the module scan found too little: is REPO_ROOT right?"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_lower_layers_import_nothing_above_them(package, graph):
    allowed = ALLOWED[package] | {package}
    wrong = sorted(f"{name} imports {dep}" for name, deps in graph.items()
                   if name.split(".")[0] == package for dep in deps
                   if dep.split(".")[0] not in allowed)
    assert not wrong, "; ".join(wrong)


# The networks' reference definitions: the original's composition, which the CPU rewrites of
# model/fast replace at run time (through the ops object a module holds, never by import).
REFERENCE_MODULES = ("model.blocks", "model.f2r", "model.detnet")
# Scripts that run a tool (the demo runs its stages); nothing else imports tools/.
TOOL_USERS = {"demo"}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


@pytest.mark.parametrize("module", REFERENCE_MODULES)
def test_reference_networks_never_import_the_inference_rewrites(module, graph):
    assert module in graph, f"{module} not found"
    wrong = sorted(d for d in reachable(graph, module) if d == "model.fast" or d.startswith("model.fast."))
    assert not wrong, f"{module} reaches {wrong}"


def test_tools_is_a_leaf(graph):
    wrong = sorted(f"{name} imports {dep}" for name, deps in graph.items()
                   if name.split(".")[0] != "tools" and name not in TOOL_USERS
                   for dep in deps if dep.split(".")[0] == "tools")
    assert not wrong, "; ".join(wrong)


def test_importing_model_pulls_in_no_data_loss_training_or_script_module():
    code = ("import sys, model, model.scfeat, model.features; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'dataloader', 'losses', 'train', 'training', 'extraction', 'registry', 'schemas', "
            "'evaluation', 'tools'})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []


MAX_FUNCTION_LINES = 80


def long_functions(root: Path = REPO_ROOT) -> list[str]:
    """Functions of the project (tests included) longer than :data:`MAX_FUNCTION_LINES` whose
    docstring does not say why (a sentence starting with ``Long because``)."""
    found = []
    for path in [*project_modules(root).values(), *sorted((root / "tests").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_long_function_finder_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "mod.py").write_text(f"def long():\n{body}\n\n\ndef excused():\n"
                                     f"    '''Long because it must be.'''\n{body}\n")
    (tmp_path / "tests").mkdir()
    assert long_functions(tmp_path) == [f"mod.py:1 long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_function_is_longer_than_80_lines_without_a_reason():
    assert long_functions() == []
