"""The house rules on size: stage modules stay stages, libraries stay readable.

- a stage module (``pipeline/stages/<name>.py``) is its params and a ``main()``: <= 200 lines;
- no module under ``pipeline/`` over 400 lines;
- no function or method over 60 lines (from ``def`` to its last line, decorators excluded).

Ruff has no line-count rule (``PLR0915`` counts statements), hence this small AST check.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

STAGE_LINES = 200
MODULE_LINES = 400
FUNCTION_LINES = 60


def modules() -> list[Path]:
    return sorted((ROOT / "pipeline").rglob("*.py"))


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def long_functions(path: Path, limit: int, root: Path = ROOT) -> list[str]:
    """``file:line name (n lines)`` for each function of ``path`` longer than ``limit``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_stage_modules_are_short() -> None:
    stages = [p for p in modules() if p.parent.name == "stages" and p.name != "__init__.py"]
    assert stages, "no stage modules found"
    too_long = {str(p.relative_to(ROOT)): line_count(p) for p in stages}
    assert {k: v for k, v in too_long.items() if v > STAGE_LINES} == {}


def test_no_module_is_over_the_limit() -> None:
    sizes = {str(p.relative_to(ROOT)): line_count(p) for p in modules()}
    assert {k: v for k, v in sizes.items() if v > MODULE_LINES} == {}


def test_no_function_is_over_the_limit() -> None:
    assert [f for p in modules() for f in long_functions(p, FUNCTION_LINES)] == []


def test_the_function_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LINES))
    path = tmp_path / "probe.py"
    path.write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n", encoding="utf-8")
    assert long_functions(path, FUNCTION_LINES, tmp_path) == [
        f"probe.py:5 long ({FUNCTION_LINES + 1} lines)"
    ]
