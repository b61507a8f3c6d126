"""The import graph of the mpq package: which module imports which, read from the source (every
import statement, at module level or inside functions, except under ``if TYPE_CHECKING:``), and
its cycles. Imports flow one way: tests/python/test_imports.py fails on any cycle.

    python scripts/import_graph.py            # the layers, bottom up, and any cycle
    python scripts/import_graph.py --dot      # Graphviz source of the graph
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "python"
EXTENSION = "mpq._C"  # the compiled stub (CMake builds it): a leaf


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    found: set[str] = set()

    def resolve(target: str) -> None:
        while target and target not in modules:  # "mpq.nn.modules.X" -> the module that defines X
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:
                resolve(f"{module}.{alias.name}")  # a submodule, else the module itself
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {(_module_name(p)): p for p in sorted((root / "mpq").rglob("*.py"))}
    modules = set(files) | {EXTENSION}
    graph = {
        name: {
            m
            for m in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", modules)
            if m.startswith("mpq")
        }
        for name, path in files.items()
    }
    graph[EXTENSION] = set()
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules by depth: layer 0 imports no mpq module, layer k only modules of layers < k."""
    depth: dict[str, int] = {}

    def d(v: str, seen: set[str]) -> int:
        if v not in depth:
            if v in seen:
                return 0  # a cycle: reported separately
            depth[v] = 1 + max((d(w, seen | {v}) for w in graph[v]), default=-1)
        return depth[v]

    for v in graph:
        d(v, set())
    return [sorted(v for v in graph if depth[v] == k) for k in range(max(depth.values()) + 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dot", action="store_true", help="print Graphviz source")
    args = p.parse_args()
    graph = import_graph()
    if args.dot:
        print("digraph mpq {\n  rankdir=BT;")
        for v in sorted(graph):
            for w in sorted(graph[v]):
                print(f'  "{v}" -> "{w}";')
        print("}")
        return 0
    found = cycles(graph)
    for k, names in enumerate(layers(graph)):
        print(f"layer {k}: {' '.join(names)}")
    for c in found:
        print("cycle:", " <-> ".join(c))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
