"""No import cycles among the ``kernels`` and ``tasks`` modules, deferred (function-level) imports included.

A cycle hidden behind a function-level import still couples the modules both ways (the layout registry exists so
that ``kernels.quant_linear`` need not know the coded modules; the weights index and the QuaRot runtime have their
own modules so that the checkpoint loader, the block driver and the rotation do not import each other). The graph
is read from the source (AST), so the test needs no optional dependency and sees every import statement.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels", "tasks")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules ``name`` imports anywhere in its source (``from a import b`` counts as ``a.b`` when that
    is a module, else ``a``)."""
    is_pkg = path.name == "__init__.py"
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "kernels.wgemm.launch.wgemm" → the module part
                t = t.rpartition(".")[0]
            if t and t != name:
                deps.add(t)
    return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    # a package's __init__ is imported with any of its submodules; only edges between modules count here
    return {
        name: {d for d in _imports(name, path, known) if not name.startswith(d + ".")} for name, path in mods.items()
    }


def test_the_graph_sees_deferred_imports() -> None:
    """The reader is not blind: known edges, one of them a function-level import, are in the graph."""
    g = _graph()
    assert "kernels.layouts" in g["tasks.checkpoint"]  # inside load_packed_model
    assert "kernels.quant_linear" in g["kernels.layouts"]
    assert "tasks.quarot_runtime" in g["tasks.driver"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_among_kernels_and_tasks() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], f"import cycles: {cycles}"
