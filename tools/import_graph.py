"""The import graph between the package's subpackages and top-level modules, and its cycles.

    python tools/import_graph.py            # one line per part: what it imports; then its cycles

Reads the source with ``ast`` (nothing is imported), counting every ``import fipo_megatron.X...`` and
``from fipo_megatron.X... import ...``. Two graphs: the import-time one (module-level imports) and the full
one (lazy imports inside functions too: a cycle that only a lazy import hides is still a cycle for a
reader). tests/test_import_graph.py keeps both graphs acyclic and ``algo`` free of everything but the
registry and logging, lazy imports included.
"""

from __future__ import annotations

import ast
import os
import sys
from collections import defaultdict

PACKAGE = "fipo_megatron"


def _part(package_dir: str, module: str) -> str | None:
    """The subpackage (``algo``) or top-level module (``trainer.py``) a dotted module name belongs to."""
    names = module.split(".")
    if names[0] != PACKAGE or len(names) < 2:
        return None
    if os.path.isdir(os.path.join(package_dir, names[1])):
        return names[1]
    if os.path.isfile(os.path.join(package_dir, names[1] + ".py")):
        return names[1] + ".py"
    return None


def _module_level(tree: ast.Module):
    """The import statements outside function bodies."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(repo: str, *, lazy: bool = True) -> dict[str, dict[str, set[str]]]:
    """``{part: {imported part: {importing module paths}}}`` for the package under ``repo``; ``lazy``:
    count the imports inside functions too."""
    package_dir = os.path.join(repo, PACKAGE)
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for root, _, files in os.walk(package_dir):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, package_dir)
            top = rel.split(os.sep)[0]
            src = top  # a subpackage directory, or a top-level module's file name
            with open(path) as f:
                tree = ast.parse(f.read(), filename=path)
            for node in (ast.walk(tree) if lazy else _module_level(tree)):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [node.module]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    continue
                for target in targets:
                    dst = _part(package_dir, target)
                    if dst is not None and dst != src:
                        graph[src][dst].add(os.path.join(PACKAGE, rel))
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one part (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    graph = import_graph(repo)
    for part in sorted(graph):
        sys.stdout.write(f"{part:14s} -> {', '.join(sorted(graph[part]))}\n")
    import_time = cycles(import_graph(repo, lazy=False))
    sys.stdout.write(f"cycles at import time: {import_time or 'none'}\n")
    found = cycles(graph)
    sys.stdout.write(f"cycles with lazy imports: {found or 'none'}\n")
    for component in found:
        for a in component:
            for b in component:
                if b in graph.get(a, {}):
                    sys.stdout.write(f"  {a} -> {b}: {sorted(graph[a][b])}\n")
    return 1 if import_time else 0


if __name__ == "__main__":
    raise SystemExit(main())
