"""The evaluation package's modules import each other without a circle.

Every import counts, also those inside functions: a lazy import hides a circle from Python
but not from a reader (nor from the next refactoring that moves it to the top).
"""
from __future__ import annotations

import ast
from pathlib import Path

import medseg_dpl

PACKAGE_ROOT = Path(medseg_dpl.__file__).resolve().parent
SUBPACKAGES = ("evaluation", "deploy")
WATCHED = "medseg_dpl.evaluation"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, modules: set[str]) -> set[str]:
    """Modules of ``modules`` that ``path`` imports anywhere (top level or in a function)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from . import x
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from pkg import mod`` imports the submodule ``pkg.mod``
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """``module -> modules it imports`` over ``medseg_dpl.evaluation`` and ``medseg_dpl.deploy``."""
    files = [p for sub in SUBPACKAGES for p in sorted((PACKAGE_ROOT / sub).glob("*.py"))]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imported(p, modules) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_lazy_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert f"{WATCHED}.predict" in graph and f"{WATCHED}.inference" in graph[f"{WATCHED}.predict"]
    assert f"{WATCHED}.predict" in graph["medseg_dpl.deploy.export"]


def test_evaluation_modules_import_without_a_circle():
    graph = import_graph()
    watched = {m: {t for t in deps if t.startswith(WATCHED)} for m, deps in graph.items()}
    cycle = find_cycle(watched)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_operations_import_no_other_evaluation_module():
    """Post-processing rules, metrics, inference and probability files are the bottom layer:
    predict, eval and the run's post-processing step build on them, never the reverse."""
    graph = import_graph()
    for name in ("postprocess", "metrics", "inference", "probabilities"):
        deps = {t for t in graph[f"{WATCHED}.{name}"] if t.startswith(WATCHED)}
        assert not deps, f"{WATCHED}.{name} imports {sorted(deps)}"
