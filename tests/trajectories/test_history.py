"""Issue-fix tasks mined from history (cwm_forager.history): a fixture repository with hand-made
fix commits, then real release histories of PyPI projects."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cwm_forager.history import (
    _GIT_ENV,
    FAMILY,
    fix_commits,
    git,
    issue_text,
    mine_repository,
    release_repository,
    reverted_functions,
)
from cwm_forager.policies import SearchRepairPolicy
from cwm_forager.repos import FIXTURE_ROOT

MEDIAN_FIX = ("Fix median of an even number of values: average the two middle values instead "
              "of returning the upper one")
BUGGY_MEDIAN = "    return ordered[middle]\n\n\ndef percentile"
FIXED_MEDIAN = "    return (ordered[middle - 1] + ordered[middle]) / 2\n\n\ndef percentile"
MODE = "\n\ndef mode(values):\n    return max(sorted(set(values)), key=values.count)\n"
MODE_TEST = "\n\ndef test_mode():\n    assert mode([1, 2, 2, 3]) == 2\n"


def commit(repo: Path, message: str) -> None:
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", message, env=_GIT_ENV)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def calc_with_median_bug(tmp_path: Path, message: str) -> tuple[Path, Path, Path]:
    """(repository, calc/stats.py, tests/test_stats.py): the calc fixture committed as the first
    commit of a new repository, its median buggy and the test that catches it removed."""
    repo = tmp_path / "calc"
    shutil.copytree(FIXTURE_ROOT / "calc", repo)
    stats, tests = repo / "calc/stats.py", repo / "tests/test_stats.py"
    edit(stats, FIXED_MEDIAN, BUGGY_MEDIAN)
    edit(tests, "    assert median([4, 1, 3, 2]) == 2.5\n", "")
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit(repo, message)
    return repo, stats, tests


@pytest.fixture()
def fixture_history(tmp_path) -> Path:
    """calc with a median bug; a fix commit with its test (and a new function with its test);
    a docs-only commit; a source change without tests."""
    repo, stats, tests = calc_with_median_bug(tmp_path, "calc: arithmetic and statistics")
    edit(stats, BUGGY_MEDIAN, FIXED_MEDIAN)
    stats.write_text(stats.read_text() + MODE)
    edit(tests, "    assert median([3, 1, 2]) == 2\n",
         "    assert median([3, 1, 2]) == 2\n    assert median([4, 1, 3, 2]) == 2.5\n")
    edit(tests, "histogram, median,", "histogram, median, mode,")
    tests.write_text(tests.read_text() + MODE_TEST)
    commit(repo, MEDIAN_FIX)
    (repo / "README.md").write_text("calc\n")
    commit(repo, "Release 0.2")
    edit(stats, "    squares = [", "    squares = [  # deviations\n        ")
    commit(repo, "variance: comment")
    return repo


def test_reverted_functions_put_one_function_back_at_a_time():
    before = "def a():\n    return 1\n\n\ndef b():\n    return 2\n"
    after = ("def a():\n    return 1\n\n\ndef b():\n    return 3\n\n\n"
             "@staticmethod\ndef c():\n    def inner():\n        pass\n    return inner\n")
    got = {name: source for name, _, source in reverted_functions(before, after)}
    assert set(got) == {"b", "c"}  # a is unchanged; c.inner is inside c
    assert got["b"] == after.replace("return 3", "return 2")
    assert "def c" not in got["c"] and "@staticmethod" not in got["c"]


def test_issue_text_needs_enough_words():
    assert issue_text(MEDIAN_FIX) == MEDIAN_FIX
    assert issue_text("toolz 1.0.0") == ""
    assert issue_text("fix") == ""


def test_fix_commits_are_those_changing_source_and_tests(fixture_history):
    commits, scanned = fix_commits(fixture_history)
    assert scanned == 3
    (fix,) = commits
    assert fix.message == MEDIAN_FIX
    assert fix.sources == ("calc/stats.py",) and fix.tests == ("tests/test_stats.py",)


def test_mined_tasks_are_validated_fail_to_pass_and_solved_by_the_gold_patch(fixture_history):
    report = mine_repository(fixture_history, policy=SearchRepairPolicy())
    assert report.summary() | {"rejected": None, "solved": None} == {
        "repo": "calc", "commits_scanned": 3, "fix_commits": 1, "tasks_found": 2,
        "validated": 2, "rejected": None, "solved": None}
    assert len(report.trajectories) == 2 and report.solved == sum(
        t.success for t in report.trajectories)
    by_function = {t.function: t for t in report.tasks}
    median = by_function["median"]
    assert median.family == FAMILY and median.issue == MEDIAN_FIX
    assert median.failing_tests == ("tests/test_stats.py::test_median",)
    assert MEDIAN_FIX in median.statement()
    assert "-    return ordered[middle]" in median.gold_patch
    assert "def mode" not in by_function["mode"].mutated  # a new function: the task adds it
    assert "tests/test_stats.py::test_mode" in by_function["mode"].failing_tests


@pytest.mark.slow
@pytest.mark.parametrize(("project", "versions"), [
    ("cachetools", ["5.3.3", "5.4.0", "5.5.0"]),
])
def test_real_release_histories_give_validated_tasks(tmp_path, project, versions):
    """Each release a commit; the tasks are the releases' own fail-to-pass evidence. (More
    projects, and the search policy's solve rate: benchmarks/issue_fix_history.py.)"""
    repo = release_repository(project, versions, tmp_path / project)
    report = mine_repository(repo)
    print(report.summary())
    assert report.commits_scanned == len(versions) - 1
    assert report.validated >= 1, report.summary()
    for task in report.tasks:
        assert task.family == FAMILY and task.failing_tests and task.gold_patch
