"""The package's shape stays readable: file and function sizes, and who imports mlflow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sf_mlflow"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _function_lengths(tree: ast.AST):
    """(name, first line, lines without the docstring) of every function and method."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                length -= first.end_lineno - first.lineno + 1
            yield node.name, node.lineno, length


def test_the_package_has_sources():
    assert len(SOURCES) > 20


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_or_function_is_too_long(path):
    text = path.read_text()
    n_lines = len(text.splitlines())
    assert n_lines <= MAX_FILE_LINES, f"{path.name} has {n_lines} lines; split it (<= {MAX_FILE_LINES})"
    long = [f"{name} (line {line}): {length} lines" for name, line, length in
            _function_lengths(ast.parse(text)) if length > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in {path.name}: {long}"


def test_the_size_check_counts_the_def_line_and_the_body_but_not_the_docstring():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f'def f():\n    """Doc\n\n    on three lines."""\n{body}\n')
    assert [length for *_, length in _function_lengths(tree)] == [MAX_FUNCTION_LINES + 1]


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_tracking_imports_mlflow():
    importers = [str(p.relative_to(PACKAGE)) for p in SOURCES
                 if "mlflow" in _imports(ast.parse(p.read_text()))]
    assert importers and all(p.startswith("tracking/") for p in importers), importers
