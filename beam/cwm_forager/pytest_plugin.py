"""A pytest plugin loaded into sandboxed test runs (``-p cwm_forager.pytest_plugin``).

It reports, one JSON line per test as soon as the test ends (so a run killed half-way still
tells which tests ran), the test's outcome and, when asked, the source lines it executed: the
"spectrum" that task synthesis uses to find test-covered functions and that the search policy
uses to localise faults (Ochiai over failing against passing tests).

Environment (set by :mod:`cwm_forager.env`):
``CWM_REPORT``   file to append the JSON lines to;
``CWM_SELECT``   optional file of test ids (one a line): other collected tests are deselected;
``CWM_TRACE``    optional directory: record executed lines of non-test ``.py`` files below it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

_REPORT = os.environ.get("CWM_REPORT")
_SELECT = os.environ.get("CWM_SELECT")
_TRACE_ROOT = os.environ.get("CWM_TRACE")


def is_test_file(path: str) -> bool:
    """Test modules and pytest configuration: never mutated, never counted as source."""
    parts = Path(path).parts
    name = parts[-1] if parts else path
    return (name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"
            or any(p in ("tests", "test", "testing") for p in parts[:-1]))


class _LineTracer:
    """Collects executed (file, line) pairs of source files under one root."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root) + os.sep
        self.lines: dict[str, set[int]] = {}
        self._wanted: dict[str, str | None] = {}

    def _relpath(self, filename: str) -> str | None:
        if filename not in self._wanted:
            real = os.path.realpath(filename)
            rel = real[len(self.root):] if real.startswith(self.root) else None
            self._wanted[filename] = rel if rel and rel.endswith(".py") and not is_test_file(rel) else None
        return self._wanted[filename]

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        rel = self._relpath(frame.f_code.co_filename)
        if rel is None:
            return None
        lines = self.lines.setdefault(rel, set())
        lines.add(frame.f_lineno)

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                lines.add(frame.f_lineno)
            return local

        return local

    def start(self) -> None:
        self.lines = {}
        sys.settrace(self._global)

    def stop(self) -> dict[str, list[int]]:
        sys.settrace(None)
        return {path: sorted(lines) for path, lines in self.lines.items()}


_tracer = _LineTracer(_TRACE_ROOT) if _TRACE_ROOT else None
_results: dict[str, dict[str, Any]] = {}


def _emit(record: dict[str, Any]) -> None:
    if _REPORT:
        with open(_REPORT, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _SELECT:
        return
    wanted = set(Path(_SELECT).read_text(encoding="utf-8").splitlines())
    keep = [item for item in items if item.nodeid in wanted]
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in wanted])
    items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Any:
    _results[item.nodeid] = {"nodeid": item.nodeid, "outcome": "passed"}
    if _tracer:
        _tracer.start()
    try:
        yield
    finally:
        record = _results.pop(item.nodeid)
        if _tracer:
            record["lines"] = _tracer.stop()
        _emit(record)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    record = _results.get(report.nodeid)
    if record is None:
        return
    if report.failed:
        record["outcome"] = "failed" if report.when == "call" else "error"
    elif report.skipped and record["outcome"] == "passed":
        record["outcome"] = "skipped"
