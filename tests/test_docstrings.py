"""Every public module, class, function and method of the covered parts of ``fipo_megatron`` has a docstring.

Public: a name without a leading underscore, at module level or inside a public class (methods and
properties; a property's setter shares its getter's docstring). Functions nested in functions are not
public. ``COVERED`` lists the subpackages and modules held to this; a part joins it once its docstrings
are complete.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fipo_megatron"

COVERED = [
    "actor",
    "algo",
    "checkpoint",
    "models",
    "parallel",
    "rollout",
    "weights",
    "data",
    "plan",
    "testing",
    "__init__",
    "__main__",
    "batch",
    "build",
    "cli",
    "config",
    "config_loader",
    "guards",
    "log",
    "metrics",
    "registry",
    "token_records",
    "trainer",
]


def _files() -> list[Path]:
    out = []
    for entry in COVERED:
        path = PACKAGE / entry
        if path.is_dir():
            out += sorted(path.rglob("*.py"))
        else:
            out.append(path.with_suffix(".py"))
    return out


def _is_setter(node: ast.AST) -> bool:
    return any(isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter") for d in node.decorator_list)


def missing_docstrings(tree: ast.Module) -> list[str]:
    """``name:line`` of every public definition of ``tree`` without a docstring (``<module>`` for the module)."""
    missing = [] if ast.get_docstring(tree) else ["<module>:1"]

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_") or _is_setter(node):
                    continue
                if ast.get_docstring(node) is None:
                    missing.append(f"{prefix}{node.name}:{node.lineno}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.If, ast.Try)) and not prefix:  # e.g. definitions under a version check
                visit(node.body + node.orelse, prefix)

    visit(tree.body, "")
    return missing


def test_covered_parts_exist():
    for entry in COVERED:
        path = PACKAGE / entry
        assert path.is_dir() or path.with_suffix(".py").is_file(), entry


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_public_definitions_have_docstrings(path: Path):
    missing = missing_docstrings(ast.parse(path.read_text(), filename=str(path)))
    assert not missing, f"{path.relative_to(PACKAGE.parent)}: no docstring on {', '.join(missing)}"
