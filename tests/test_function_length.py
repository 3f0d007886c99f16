"""No function longer than 60 lines outside benchmarks/ and tests/ (CONTRIBUTING.md): a long body
is split by meaning. Counted from the ``def`` line to the last line, docstring and comments
included, nested functions inside their parent's count as well as their own."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("operator", "beam", "jobs", "model")
LIMIT = 60


def long_functions(root: Path) -> list[str]:
    found = []
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            if "fixture" in path.as_posix():  # fixture repositories are data, not our code
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > LIMIT:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} "
                                     f"({length} lines)")
    return found


def test_no_function_is_longer_than_60_lines() -> None:
    assert long_functions(REPO) == []


def test_the_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m.py").write_text(f"def f():\n{body}\n")
    assert long_functions(tmp_path) == [f"model/m.py:1 f ({LIMIT + 1} lines)"]
