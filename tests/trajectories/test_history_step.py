"""Issue-fix tasks from history in the trajectories step (``spec.data.trajectories.issueFix``):
the spec's errors, the flags, the selection's held-out rule and the parts' dealing (fast), then
the whole step on a fixture repository with hand-made fix commits."""

from __future__ import annotations

import json
import re

import pytest

from cwm_beam import trajectories
from cwm_beam.parts import Part
from cwm_forager.history import FAMILY, git
from cwm_forager.records import check_record
from cwm_spec import artifacts
from tests.trajectories.test_history import MEDIAN_FIX, fixture_history  # noqa: F401 (fixture)
from tests.trajectories.test_pipeline import step_config


@pytest.mark.parametrize(("source", "field", "fragment"), [
    ({"pypi": "cachetools==5.5.0", "versions": ["5.4.0", "5.5.0"]}, "spec.issueFix.sources[0]",
     "must be a project name"),
    ({"pypi": "cachetools", "versions": ["5.5.0"]}, "spec.issueFix.sources[0]",
     "two or more distinct released versions"),
    ({"git": "https://example.invalid/r.git", "versions": ["1"]}, "spec.issueFix.sources[0]",
     "versions is only meaningful with pypi"),
    ({"pypi": "cachetools", "versions": ["1", "2"], "since": "1"}, "spec.issueFix.sources[0]",
     "since and until are only meaningful with git"),
    ({"pypi": "a", "git": "b"}, "spec.issueFix.sources[0]", "exactly one of pypi, git"),
    ({"git": "b", "ref": "x"}, "spec.issueFix.sources[0].ref", "unknown field"),
])
def test_bad_history_source_names_the_field(tmp_path, source, field, fragment):
    path = step_config(tmp_path, issueFix={"sources": [source]})
    with pytest.raises(ValueError, match=f"(?s){re.escape(field)}.*{fragment}"):
        trajectories.load_job(["--config", str(path)])


def test_issue_fix_settings_from_config_and_flags(tmp_path):
    path = step_config(tmp_path, issueFix={
        "sources": [{"pypi": "cachetools", "versions": ["5.4.0", "5.5.0"]}], "maxCommits": 3})
    settings = trajectories.load_job(["--config", str(path)]).settings
    assert settings.history_sources == ({"pypi": "cachetools", "versions": ["5.4.0", "5.5.0"]},)
    assert settings.spec.issue_fix.max_commits == 3
    assert settings.spec.issue_fix.tasks_per_repository == 20  # the API's default
    job = trajectories.load_job(["--history", "toolz==0.12.0,1.0.0", "--history",
                                 "/src/r.git#v1..main", "--history", "/src/s", "--max-commits",
                                 "5", "--issue-fix-tasks", "2", "--output", str(tmp_path / "o")])
    assert job.settings.history_sources == (
        {"pypi": "toolz", "versions": ["0.12.0", "1.0.0"]},
        {"git": "/src/r.git", "since": "v1", "until": "main"}, {"git": "/src/s"})
    assert job.settings.spec.issue_fix.tasks_per_repository == 2


def _item(task_id, function, commit, source="calc"):
    original = f"def {function}():\n    return {commit!r}\n"
    return {"repository": {"git": "/r", "ref": commit}, "history": source,
            "task": {"task_id": task_id, "original": original, "path": "m.py",
                     "function": function}}


def test_issue_fix_selection_skips_held_out_functions_and_takes_commits_in_turn():
    items = [_item("a1", "f", "c1"), _item("a2", "g", "c1"), _item("b1", "h", "c2"),
             _item("b2", "k", "c2")]
    held_out = [trajectories.task_program(items[1]["task"])]  # g at c1 is a held-out program
    out = list(trajectories.select_issue_fix(("calc", items), 2, held_out))
    excluded = [o.value for o in out if hasattr(o, "tag")]
    chosen = [o["task"]["task_id"] for o in out if not hasattr(o, "tag")]
    assert excluded == [("calc|excluded_for_evaluation", 1)]
    assert chosen == ["b1", "a1"]  # newest commit first, then the other commit's turn


def test_history_sources_follow_their_repository_to_its_part():
    spec = {"repositories": [{"pypi": "cachetools==5.5.0"}, {"path": "calc"}],
            "issueFix": {"sources": [{"git": "/src/calc"},
                                     {"pypi": "Cachetools", "versions": ["5.4.0", "5.5.0"]},
                                     {"pypi": "toolz", "versions": ["0.12.0", "1.0.0"]}]}}
    owned = []
    for index in range(2):
        settings = trajectories.Settings.from_spec(spec, trajectories.data_step.Limits(),
                                                   part=Part(index, 2))
        owned.append([h.get("pypi") or h.get("git") for h in trajectories.owned_histories(settings)])
    # calc is repository 1 (part 1), cachetools repository 0 (part 0); toolz is position 2 + 2
    assert owned == [["Cachetools", "toolz"], ["/src/calc"]]


@pytest.mark.slow
def test_step_writes_issue_fix_tasks_from_a_fixture_history(fixture_history, tmp_path,  # noqa: F811
                                                            monkeypatch):
    """The fixture's one fix commit (median fixed, mode added, with their tests) through the
    whole step beside calc's mutate-fix tasks: two issue-fix tasks validated and rolled out, the
    per-source numbers and the family's solve rate in the manifest."""
    monkeypatch.setenv("CWM_CACHE", str(tmp_path / "cache"))  # the commit's clone lands here
    out = tmp_path / "ds"
    stats = trajectories.run(["--repo", "calc", "--history", str(fixture_history),
                              "--tasks-per-repo", "1", "--held-out-tasks", "1", "--max-turns", "6",
                              "--output", str(out)])
    manifest = artifacts.verify(str(out))
    row = manifest.stats["issue_fix"]["calc"]
    assert row == stats["issue_fix"]["calc"]
    assert {k: row[k] for k in ("commits_scanned", "fix_commits", "tasks_found", "validated")} == {
        "commits_scanned": 3, "fix_commits": 1, "tasks_found": 2, "validated": 2}
    assert row["episodes"] + row["excluded_for_evaluation"] == 2
    records = [check_record(r) for r in artifacts.iter_records(str(out), "train")]
    issue_fix = [r for r in records if r["meta"]["family"] == FAMILY]
    fix_sha = git(fixture_history, "rev-parse", "HEAD~2").strip()
    assert issue_fix and len(issue_fix) + stats["duplicates"] >= row["episodes"]
    for record in issue_fix:
        assert record["meta"]["history"] == "calc"
        assert record["meta"]["repository"] == {"git": str(fixture_history), "ref": fix_sha}
        assert record["task"]["failing_tests"] and record["task"]["gold_patch"]
        assert record["task"]["function"] in ("median", "mode")
    median = [r for r in issue_fix if r["task"]["function"] == "median"]
    assert all(MEDIAN_FIX in json.dumps(r["messages"]) for r in median)  # the issue text
    rate = stats["solve_rate_by_family"][FAMILY]
    assert rate["episodes"] == row["episodes"] and rate["solved"] == row["solved"]
    assert row["rate"] == pytest.approx(row["solved"] / row["episodes"], abs=1e-3)
    # decontamination: no issue-fix training task restores a held-out task's function
    assert not set(manifest.programs["train"]) & set(manifest.programs["eval_tasks"])
    assert stats["eval_tasks"] == 1
    print(json.dumps({k: stats[k] for k in ("issue_fix", "solve_rate_by_family", "rejected")}))
