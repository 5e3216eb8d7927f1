"""The code's shape (docs/architecture.md): files and functions a reader can hold, and every
``_target_`` the shipped configs name importable (renamed modules stay reachable)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from hydra.utils import get_class

import cdnv2

SRC = Path(cdnv2.__file__).resolve().parent
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "configs" not in p.parts)


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"split these files (one concept per file): {long}"


def test_long_functions_say_why():
    """A function over ~60 lines states in its docstring why it is that long ("60 lines")."""
    long = []
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and "60 lines" not in (ast.get_docstring(node) or ""):
                    long.append(f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"split these functions or say why in the docstring: {long}"


@pytest.mark.parametrize("config", sorted((SRC / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_config_targets_import(config):
    for target in re.findall(r"^\s*_target_:\s*([\w.]+)", config.read_text(), flags=re.M):
        assert get_class(target) is not None, target
