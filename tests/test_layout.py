"""The layout rules: `tests/` mirrors `selfrefine/` file for file, and no function in the library is long.

- `selfrefine/X.py` is tested in `tests/test_X.py`, `selfrefine/P/X.py` in `tests/P/test_X.py`, and a sub-package's
  own `selfrefine/P/__init__.py` in `tests/P/test_P.py` (`selfrefine/__init__.py` and `selfrefine/recipes/__init__.py`
  hold no code of their own).
- A function (method, nested function) is at most 60 lines, `def` line to last line; `trainer.train`, the training
  loop, at most 90.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC, TESTS = ROOT / "selfrefine", ROOT / "tests"
NO_TEST_FILE = {"__init__.py", "recipes/__init__.py"}  # relative to selfrefine/
MAX_LINES = 60
LONGER = {"trainer.py::train": 90}  # module::qualified name -> its own limit
MODULES = sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py"))


def mirrored_test(module: str) -> Path:
    """`tasks/arith.py` -> tests/tasks/test_arith.py; `tasks/__init__.py` -> tests/tasks/test_tasks.py."""
    path = Path(module)
    name = path.parent.name if path.name == "__init__.py" else path.stem
    return TESTS / path.parent / f"test_{name}.py"


def functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    """(qualified name, length in lines) of every function in `tree`, methods and nested functions included."""
    found = []
    for node in ast.iter_child_nodes(tree):
        name = f"{prefix}{getattr(node, 'name', '')}"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((name, node.end_lineno - node.lineno + 1))
            found += functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            found += functions(node, f"{name}.")
        else:
            found += functions(node, prefix)
    return found


def test_mirrored_test_names():
    assert mirrored_test("flags.py") == TESTS / "test_flags.py"
    assert mirrored_test("tasks/arith.py") == TESTS / "tasks" / "test_arith.py"
    assert mirrored_test("tasks/__init__.py") == TESTS / "tasks" / "test_tasks.py"


def test_functions_finds_methods_and_nested_functions():
    tree = ast.parse("def f():\n    def g():\n        pass\n    return g\n\n\nclass C:\n    async def m(self):\n"
                     "        if True:\n            def h():\n                pass\n")
    assert functions(tree) == [("f", 4), ("f.g", 2), ("C.m", 4), ("C.m.h", 2)]


@pytest.mark.parametrize("module", [m for m in MODULES if m not in NO_TEST_FILE])
def test_module_has_its_test_file(module: str):
    test_file = mirrored_test(module)
    assert test_file.is_file(), f"selfrefine/{module} has no {test_file.relative_to(ROOT)}"


@pytest.mark.parametrize("module", MODULES)
def test_functions_are_short(module: str):
    tree = ast.parse((SRC / module).read_text(encoding="utf-8"))
    too_long = [f"selfrefine/{module}::{name} is {lines} lines (at most {LONGER.get(f'{module}::{name}', MAX_LINES)})"
                for name, lines in functions(tree) if lines > LONGER.get(f"{module}::{name}", MAX_LINES)]
    assert not too_long, "\n".join(too_long)
