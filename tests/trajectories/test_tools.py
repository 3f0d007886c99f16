"""The agent's tools on a task copy of the calc fixture repository."""

from __future__ import annotations

import json

import pytest

from cwm_forager.tools import TOOLS, ToolRunner, cap_observation, mask_durations


@pytest.fixture()
def runner(calc_env):
    workdir = calc_env.fresh_task_copy()
    yield ToolRunner(calc_env, workdir, max_observation_chars=2000, action_timeout=20)
    calc_env.discard(workdir)


def test_schemas_name_the_five_tools():
    assert [t["function"]["name"] for t in TOOLS] == ["bash", "view", "create", "edit", "submit"]
    for tool in TOOLS:
        assert tool["type"] == "function" and tool["function"]["parameters"]["type"] == "object"


def test_view_numbers_lines_and_lists_folders(runner):
    out = runner.call("view", {"path": "calc/arith.py", "start_line": 7, "end_line": 8}).observation
    assert out == "7  def add(a, b):\n8      return a + b"
    assert "arith.py" in runner.call("view", {"path": "calc"}).observation


def test_edit_requires_a_unique_match(runner):
    assert "found 0 times" in runner.call("edit", {"path": "calc/arith.py", "search": "nope",
                                                    "replace": "x"}).observation
    assert "found 2 times" not in runner.call("edit", json.dumps(
        {"path": "calc/arith.py", "search": "return a + b", "replace": "return b + a"})).observation
    assert "return b + a" in (runner.workdir / "calc/arith.py").read_text()
    many = runner.call("edit", {"path": "calc/arith.py", "search": "return ", "replace": "x"})
    assert "must match exactly once" in many.observation


def test_create_then_bash_sees_it(runner):
    assert runner.call("create", {"path": "notes/a.txt", "content": "hello\n"}).observation.startswith("Wrote 1 lines")
    out = runner.call("bash", {"command": "cat notes/a.txt; exit 3"}).observation
    assert out.startswith("hello") and out.endswith("[exit code 3]")


def test_paths_outside_the_repository_are_refused(runner):
    for path in ("/etc/passwd", "../../x", "calc/../../y"):
        assert "outside the repository" in runner.call("view", {"path": path}).observation
    (runner.workdir / "link").symlink_to("/etc")
    assert "outside the repository" in runner.call("view", {"path": "link/passwd"}).observation


def test_malformed_calls_become_observations(runner):
    assert "not valid JSON" in runner.call("bash", "{oops").observation
    assert "unknown tool 'rm'" in runner.call("rm", {}).observation
    assert "bad arguments for view" in runner.call("view", {"file": "x"}).observation
    assert runner.call("submit", None).done


def test_bash_output_is_capped_and_pytest_durations_masked(runner):
    out = runner.call("bash", {"command": "python -m pytest -q tests/test_arith.py; seq 1 5000"}).observation
    assert "characters omitted" in out and len(out) <= 2000
    assert "passed in N.NNs" in out
    assert out.endswith("5000\n\n[exit code 0]")


def test_pure_helpers():
    assert cap_observation("a" * 100, 50).count("a") < 50
    assert cap_observation("short", 50) == "short"
    assert mask_durations("== 3 passed in 0.52s ==") == "== 3 passed in N.NNs =="
