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


def test_schemas_name_cwms_four_tools():
    assert [t["function"]["name"] for t in TOOLS] == ["bash", "edit", "create", "submit"]
    for tool in TOOLS:
        assert tool["type"] == "function" and tool["function"]["parameters"]["type"] == "object"


# Expected observations are CWM's messages (cwm/rl/swerl/plugins/edit.py, create.py,
# cwm/rl/swerl/tools.py submit_diff_file), written out here by hand.

def test_edit_matches_whole_lines_once_and_shows_a_numbered_snippet(runner):
    arith = runner.workdir / "calc/arith.py"
    lines = arith.read_text().split("\n")
    assert runner.call("edit", {"path": "calc/arith.py", "search": "nope", "replace": "x"}
                       ).observation == ("No replacement was performed, the search lines did not "
                                         "appear verbatim in calc/arith.py.")
    indented = runner.call("edit", {"path": "calc/arith.py", "search": "return a + b",
                                    "replace": "x"}).observation
    assert indented.endswith("The search lines must exactly match one or more consecutive lines "
                             "from the file, with indentations preserved.")
    many = [i + 1 for i, line in enumerate(lines) if line.startswith("    return ")]
    assert runner.call("edit", {"path": "calc/arith.py", "search": "    return ", "replace": "x"}
                       ).observation == ("No replacement was performed. Multiple occurrences of "
                                         f"the search text in lines {many} of calc/arith.py. "
                                         "Please ensure it is unique.")
    done = runner.call("edit", json.dumps({"path": "calc/arith.py", "search": "    return a + b",
                                           "replace": "    return b + a"})).observation
    line = lines.index("    return a + b") + 1
    new = arith.read_text().split("\n")
    first, last = max(1, line - 8), line + 8
    snippet = "\n".join(f"{i:6}\t{new[i - 1]}" for i in range(first, min(last, len(new)) + 1))
    assert done == (f"File calc/arith.py has been successfully updated at line {line} and now "
                    f"contains {len(new)} lines. The surrounding lines after the edit are shown "
                    f"below:\n{snippet}\nReview the changes and make sure they are as expected.")
    assert "return b + a" in arith.read_text()
    assert runner.call("edit", {"path": "nope.py", "search": "a", "replace": "b"}).observation == (
        "The path nope.py does not exist. Please provide a valid path.")


def test_create_refuses_an_existing_path_and_a_missing_folder(runner):
    assert runner.call("create", {"path": "notes.txt", "content": "hello\n"}).observation == (
        "File created successfully at: notes.txt (2 lines).")
    out = runner.call("bash", {"command": "cat notes.txt; exit 3"}).observation
    assert out.startswith("hello") and out.endswith("[exit code 3]")
    assert runner.call("create", {"path": "notes.txt", "content": "x"}).observation == (
        "notes.txt already exists. Cannot create a new file at an existing path.")
    assert (runner.workdir / "notes.txt").read_text() == "hello\n"
    refused = runner.call("create", {"path": "new/a.txt", "content": "x"}).observation
    assert refused.startswith("File creation failed. The parent directory ")
    assert refused.endswith("/new does not exist.")


def test_submit_takes_the_path_of_a_diff(runner):
    (runner.workdir / "empty.diff").write_text("")
    (runner.workdir / "notes.diff").write_text("not a patch\n")
    patch = "diff --git a/x b/x\n--- a/x\n+++ b/x\n"
    (runner.workdir / "fix.diff").write_text(patch)
    assert runner.call("submit", {"path": "missing.diff"}).observation == (
        "Failed to submit missing.diff. Make sure it exists and is readable.")
    assert runner.call("submit", {"path": "empty.diff"}).observation == (
        "Failed to submit empty.diff. It is an empty file.")
    assert runner.call("submit", {"path": "notes.diff"}).observation == (
        "Failed to submit notes.diff. It is not a valid diff file.")
    result = runner.call("submit", {"path": "fix.diff"})
    assert result.done and result.observation == patch


def test_paths_outside_the_repository_are_refused(runner):
    for path in ("/etc/passwd", "../../x", "calc/../../y"):
        assert "outside the repository" in runner.call("edit", {
            "path": path, "search": "a", "replace": "b"}).observation
    (runner.workdir / "link").symlink_to("/etc")
    assert "outside the repository" in runner.call("submit", {"path": "link/passwd"}).observation


def test_native_plain_text_bodies_are_accepted(runner):
    """CWM's server passes a body it does not map natively through as the arguments text."""
    assert runner.call("bash", "echo native").observation.startswith("native")
    body = ("calc/arith.py\n<<<<<<< SEARCH\n    return a + b\n=======\n    return b + a\n"
            ">>>>>>> REPLACE")
    assert "has been successfully updated" in runner.call("edit", body).observation


def test_malformed_calls_become_observations(runner):
    assert "not valid JSON" in runner.call("edit", "{oops").observation
    assert "unknown tool 'view'" in runner.call("view", {"path": "calc"}).observation
    assert "bad arguments for edit" in runner.call("edit", {"file": "x"}).observation
    assert not runner.call("submit", None).done


def test_bash_output_is_capped_and_pytest_durations_masked(runner):
    out = runner.call("bash", {"command": "python -m pytest -q tests/test_arith.py; seq 1 5000"}).observation
    assert "characters omitted" in out and len(out) <= 2000
    assert "passed in N.NNs" in out
    assert out.endswith("5000\n\n[exit code 0]")


def test_pure_helpers():
    assert cap_observation("a" * 100, 50).count("a") < 50
    assert cap_observation("short", 50) == "short"
    assert mask_durations("== 3 passed in 0.52s ==") == "== 3 passed in N.NNs =="
