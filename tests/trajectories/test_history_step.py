"""Issue-fix tasks from history in the trajectories step (``spec.data.trajectories.issueFix``):
the spec's errors, the flags, the selection's held-out rule and the parts' dealing (fast), then
the whole step on a fixture repository with hand-made fix commits."""

from __future__ import annotations

import json
import re

import pytest

from cwm_beam import trajectories
from cwm_beam.parts import Part
from cwm_forager.history import (
    FAMILY,
    FixCommit,
    commit_environment,
    commit_tasks,
    fix_commits,
    git,
    open_history,
)
from cwm_forager.records import check_record
from cwm_forager.repos import RepositoryError
from cwm_forager.tasks import Task, validate_task
from cwm_spec import artifacts
from tests.scripted_endpoint import JSONHandler, base_url, chat_reply, serving
from tests.trajectories.test_history import (  # noqa: F401 (fixture_history: a fixture)
    BUGGY_MEDIAN,
    FIXED_MEDIAN,
    MEDIAN_FIX,
    calc_with_median_bug,
    commit,
    edit,
    fixture_history,
)
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


def test_two_histories_of_one_name_are_refused(tmp_path):
    path = step_config(tmp_path, issueFix={"sources": [
        {"pypi": "calc", "versions": ["1", "2"]}, {"git": "/src/calc/"}]})
    with pytest.raises(ValueError, match=r"spec\.issueFix: .*sources\[0\] and sources\[1\]"):
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


def test_commit_environments_are_specs_any_process_can_fetch(tmp_path):
    release = FixCommit("a" * 40, "b" * 40, "cachetools 5.5.0", ("src/c.py",), ("tests/t.py",))
    source = {"pypi": "cachetools", "versions": ["5.4.0", "5.5.0"]}
    assert commit_environment(source, release) == {"pypi": "cachetools==5.5.0"}
    assert commit_environment({**source, "dependencies": True}, release) == {
        "pypi": "cachetools==5.5.0", "dependencies": True}
    with pytest.raises(RepositoryError, match="not a release commit"):
        commit_environment({"pypi": "toolz", "versions": ["1", "2"]}, release)
    (tmp_path / "repo").mkdir()
    assert commit_environment({"git": str(tmp_path / "repo")}, release) == {
        "git": str((tmp_path / "repo").resolve()), "ref": "a" * 40}


def test_a_git_history_is_mined_over_its_range(fixture_history, tmp_path):  # noqa: F811
    first, fix, release, last = git(fixture_history, "rev-list", "--reverse", "HEAD").split()
    repo, revisions = open_history({"git": str(fixture_history), "since": first,
                                    "until": release}, tmp_path / "bare")
    commits, scanned = fix_commits(repo, revisions)
    assert (revisions, scanned, [c.sha for c in commits]) == (f"{first}..{release}", 2, [fix])
    assert fix_commits(repo, "HEAD", max_commits=2) == ([], 2)  # the newest two: no fix
    with pytest.raises(RepositoryError, match="until 'v9' is not a commit"):
        open_history({"git": str(fixture_history), "until": "v9"}, tmp_path / "bare")


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
    assert chosen == ["a1", "b1"]  # each commit takes its turn (c2's b2 waits)


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
    whole step, as two worker processes, beside textkit's and calc's mutate-fix tasks: two
    issue-fix tasks validated and rolled out by the part that holds calc's held-out task, the
    per-source numbers and the family's solve rate in the merged manifest."""
    monkeypatch.setenv("CWM_CACHE", str(tmp_path / "cache"))  # the commit's clone lands here
    out = tmp_path / "ds"
    stats = trajectories.run(["--repo", "textkit", "--repo", "calc", "--history",
                              str(fixture_history), "--tasks-per-repo", "1", "--held-out-tasks",
                              "1", "--max-turns", "6", "--workers", "2", "--output", str(out)])
    manifest = artifacts.verify(str(out))
    row = manifest.stats["issue_fix"]["calc"]
    assert row == stats["issue_fix"]["calc"]
    parts = [artifacts.read_manifest(artifacts.part_dir(str(out), i)).stats for i in range(2)]
    assert [sorted(p["issue_fix"]) for p in parts] == [[], ["calc"]]  # calc's part (position 1)
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
    assert stats["eval_tasks"] == 2
    print(json.dumps({k: stats[k] for k in ("issue_fix", "solve_rate_by_family", "rejected")}))


@pytest.mark.slow
def test_step_mines_real_release_histories(tmp_path):
    """Two real projects' releases (cachetools 5.4.0 -> 5.5.0, parse 1.20.0 -> 1.20.1), each a
    commit, through the step: issue_fix records in the data set, validated by execution, with
    the per-source numbers and the family's solve rate in the manifest. (Longer histories and
    more-itertools: benchmarks/issue_fix_history.py.)"""
    out = tmp_path / "ds"
    stats = trajectories.run(["--repo", "calc", "--tasks-per-repo", "1", "--held-out-tasks", "1",
                              "--history", "cachetools==5.4.0,5.5.0",
                              "--history", "parse==1.20.0,1.20.1", "--max-turns", "6",
                              "--output", str(out)])
    print(json.dumps({k: stats[k] for k in ("issue_fix", "solve_rate_by_family", "rejected",
                                            "deadletter_reasons")}))
    manifest = artifacts.verify(str(out))
    records = [r for r in artifacts.iter_records(str(out), "train") if r["meta"]["family"] == FAMILY]
    for name, pin in (("cachetools", "cachetools==5.5.0"), ("parse", "parse==1.20.1")):
        row = manifest.stats["issue_fix"][name]
        assert row["commits_scanned"] == 1 and row["fix_commits"] == 1, row
        assert row["validated"] >= 1 and row["episodes"] >= 1, row
        mine = [r for r in records if r["meta"]["history"] == name]
        assert mine and all(r["meta"]["repository"] == {"pypi": pin} for r in mine)
        for record in mine:
            check_record(record)
            assert record["task"]["failing_tests"] and record["task"]["gold_patch"]
    rate = manifest.stats["solve_rate_by_family"][FAMILY]
    assert rate["episodes"] == sum(r["episodes"] for r in manifest.stats["issue_fix"].values())


class IssueWriter(JSONHandler):
    """POST /v1/chat/completions → ``reply`` as the assistant's text, after recording the
    request (a real OpenAI-compatible server's answer, no tools)."""

    reply = ""
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.read_json()
        type(self).requests.append(body)
        self.send_json(200, chat_reply(type(self).reply, body["model"], prompt_tokens=50,
                                       completion_tokens=20, total_tokens=70))


@pytest.fixture()
def issue_writer():
    IssueWriter.requests = []
    with serving(IssueWriter) as httpd:
        yield base_url(httpd)


@pytest.fixture()
def terse_history(tmp_path):
    """calc with its median bug, then the fix with its test under a message that says too
    little to be the issue."""
    repo, stats, tests = calc_with_median_bug(tmp_path, "calc")
    edit(stats, BUGGY_MEDIAN, FIXED_MEDIAN)
    edit(tests, "    assert median([3, 1, 2]) == 2\n",
         "    assert median([3, 1, 2]) == 2\n    assert median([4, 1, 3, 2]) == 2.5\n")
    commit(repo, "fix median")
    return repo


WRITTEN = ("median() of an even number of values is wrong\n\nmedian([4, 1, 3, 2]) returns 3; "
           "the median of four values should be the mean of the middle two, 2.5.")


@pytest.mark.slow
@pytest.mark.parametrize(("reply", "issue"), [
    (f"<think>The test expects 2.5.</think>\n{WRITTEN}", WRITTEN),
    ("A bug.", ""),   # says too little: the task keeps no issue
])
def test_the_policy_model_writes_the_issue_a_terse_commit_lacks(terse_history, issue_writer,
                                                                 tmp_path, monkeypatch, reply,
                                                                 issue):
    monkeypatch.setenv("CWM_CACHE", str(tmp_path / "cache"))
    IssueWriter.reply = reply
    settings = trajectories.Settings.from_spec(
        {"policy": {"kind": "openai", "endpoint": issue_writer, "model": "writer"}},
        trajectories.data_step.Limits(wall_seconds=30))
    source = {"git": str(terse_history)}
    (commit_,), _ = fix_commits(terse_history)
    spec = commit_environment(source, commit_)
    writer = trajectories.WriteIssues(settings)
    writer.setup()
    env = writer.environments().get(spec)
    (task,) = [validate_task(env, t) for t in commit_tasks(env, terse_history, commit_)]
    assert isinstance(task, Task) and task.issue == ""  # "fix median" says too little
    out = list(writer.process({"repository": spec, "task": task.to_json(), "history": "calc"}))
    counts = [o.value for o in out if hasattr(o, "tag")]
    (item,) = [o for o in out if not hasattr(o, "tag")]
    assert Task.from_json(item["task"]).issue == issue
    assert counts == ([("calc|issues_written", 1)] if issue else [])
    (request,) = IssueWriter.requests
    assert "tools" not in request and request["model"] == "writer"
    prompt = request["messages"][-1]["content"]
    assert "tests/test_stats.py::test_median" in prompt and "2.5" in prompt  # the failing output
    assert "ordered[middle - 1]" not in prompt  # never the fix
