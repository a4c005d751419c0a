"""The package's subpackages import each other without a cycle, at import time or through lazy imports;
the algorithm stays pure: ``algo`` imports nothing of ``parallel``, ``models``, ``actor`` or Megatron, not
even lazily (tools/import_graph.py reads the source with ``ast``); Megatron's parallel_state is read only by
the topology owner."""

from __future__ import annotations

import ast
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", os.path.join(REPO, "tools", "import_graph.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_cycle_between_subpackages_at_import_time():
    tool = _tool()
    graph = tool.import_graph(REPO, lazy=False)
    assert "parallel" in graph["actor"] and "batch.py" in graph["actor"]   # the graph is read, not empty
    assert tool.cycles(graph) == []


def test_no_cycle_even_through_lazy_imports():
    tool = _tool()
    assert tool.cycles(tool.import_graph(REPO)) == []


def test_the_cycle_finder_finds_cycles():
    tool = _tool()
    graph = {"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}, "d": {"a": set()}}
    assert tool.cycles(graph) == [["a", "b", "c"]]


def test_algo_imports_no_parallel_state():
    graph = _tool().import_graph(REPO)
    assert set(graph.get("algo", {})) <= {"log.py", "registry.py"}, dict(graph.get("algo", {}))
    for root, _, files in os.walk(os.path.join(REPO, "fipo_megatron", "algo")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    tree = ast.parse(f.read())
                imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
                imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
                assert not [m for m in imported if m.startswith("megatron")], name


def _reads_parallel_state(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("megatron.core.parallel_state"):
                return True
            if node.module == "megatron.core" and any(a.name == "parallel_state" for a in node.names):
                return True
        if isinstance(node, ast.Import) and any(a.name.startswith("megatron.core.parallel_state") for a in node.names):
            return True
    return False


def test_parallel_state_is_read_only_by_the_topology_owner():
    """Megatron's parallel_state globals are read in parallel/ alone (and by the planner, which builds fake
    groups into them); everything else takes its groups from the ``ParallelGroups`` bundle."""
    allowed = ("fipo_megatron/parallel/", "fipo_megatron/plan/dry_run.py")
    readers = []
    for root, _, files in os.walk(os.path.join(REPO, "fipo_megatron")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO).replace(os.sep, "/")
                with open(path) as f:
                    if _reads_parallel_state(ast.parse(f.read())):
                        readers.append(rel)
    assert "fipo_megatron/parallel/topology.py" in readers   # the check sees imports
    assert [r for r in readers if not r.startswith(allowed)] == []
