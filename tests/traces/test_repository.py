"""Repository-level traces: a fixture repository's pytest suite, run sandboxed under the tracer
and cut into per-function episodes."""

import subprocess
from pathlib import Path

import pytest

from cwm_beam import traces
from cwm_exec import repository
from cwm_exec.sandbox import Limits
from cwm_exec.trace_format import START_MARKER, parse_trace
from cwm_exec.tracer import TraceLimits
from cwm_spec import artifacts

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "minirepo"


@pytest.fixture(scope="module")
def traced():
    """One sandboxed run of the fixture's suite: episode records and dead letters by entry."""
    out = list(repository.trace_repository(
        {"kind": "repository", "uri": str(FIXTURE), "perFunction": 2},
        TraceLimits(max_events=300), Limits(memory_mb=1024)))
    episodes = [o for o in out if "_deadletter" not in o]
    return episodes, [o["_deadletter"] for o in out if "_deadletter" in o]


def by_entry(episodes, entry):
    return [e for e in episodes if e["entry"] == entry]


def test_each_function_a_test_calls_is_an_episode_with_its_module_as_context(traced):
    episodes, dead = traced
    assert dead == []
    assert {e["entry"] for e in episodes} == {
        "Stack.__init__", "Stack.push", "Stack.pop", "total", "spin", "wrap"}
    assert len(by_entry(episodes, "total")) == 2            # perFunction caps repeats
    push = by_entry(episodes, "Stack.push")[0]
    assert push["path"] == "minirepo/core.py" and push["test"].endswith("::test_stack")
    source, frames = parse_trace(push["_result"]["text"])
    assert "    def push(self, value):  " + START_MARKER in source.splitlines()
    assert source.replace("  " + START_MARKER, "") == push["code"]
    assert push["code"] == (FIXTURE / "minirepo" / "core.py").read_text()
    # CWM keeps the marker in the context only: the call frame's action is the plain def line.
    assert frames[0].event == "call" and frames[0].line == "    def push(self, value):\n"
    assert push["_result"]["return_repr"] == "1" and push["input"].endswith("value=3")


def test_callees_in_other_modules_are_stepped_into(traced):
    episodes, _ = traced
    total = by_entry(episodes, "total")[0]
    _, frames = parse_trace(total["_result"]["text"])
    assert [f.line for f in frames if f.event == "call"][1:] == ["def double(x):\n"] * 3
    assert total["_result"]["return_repr"] == "12"


def test_exceptions_failing_tests_and_addresses(traced):
    episodes, _ = traced
    pop = [e for e in by_entry(episodes, "Stack.pop") if e["_result"]["exception"]]
    assert pop and pop[0]["_result"]["exception"] == "IndexError('pop from an empty stack')"
    assert any(e["test"].endswith("::test_failing") for e in episodes)   # failing test: data
    wrap = by_entry(episodes, "wrap")[0]
    assert "object at 0x...>" in wrap["_result"]["return_repr"]
    assert "0x7" not in wrap["_result"]["text"]


def test_an_episode_over_the_limits_is_cut_and_the_suite_goes_on(traced):
    episodes, _ = traced
    spin = by_entry(episodes, "spin")[0]
    assert spin["_result"]["truncated_reason"] == "max_events (300)"
    record = traces.to_record(spin, TraceLimits(max_events=300))
    assert record["_deadletter"]["reason"] == "trace limit: max_events (300)"
    assert by_entry(episodes, "wrap")        # tests after the cut episode still traced


def test_depth_zero_records_no_callees(tmp_path):
    out = list(repository.trace_repository(
        {"kind": "repository", "uri": str(FIXTURE), "depth": 0, "perFunction": 1},
        TraceLimits(), Limits()))
    total = next(o for o in out if o.get("entry") == "total")
    assert [f["event"] for f in total["_result"]["frames"]].count("call") == 1


def test_git_url_is_cloned(tmp_path):
    origin = tmp_path / "origin"
    subprocess.run(["cp", "-r", str(FIXTURE), str(origin)], check=True)
    git = ["git", "-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "fixture"], check=True)
    copy = repository.fetch(f"file://{origin}", tmp_path / "clone")
    assert (copy / "minirepo" / "core.py").read_text() == (
        FIXTURE / "minirepo" / "core.py").read_text()
    assert not (copy / ".git").exists()


def test_missing_repository_is_a_dead_letter():
    out = list(repository.trace_repository({"kind": "repository", "uri": "/nonexistent/repo"},
                                           TraceLimits(), Limits()))
    assert [o["_deadletter"]["reason"] for o in out] == ["repository not fetched"]


@pytest.mark.slow
def test_pipeline_writes_repository_records(tmp_path):
    stats = traces.run(["--source", f"repository:{FIXTURE}", "--output", str(tmp_path / "ds"),
                        "--validation-fraction", "0"])
    records = list(artifacts.iter_records(str(tmp_path / "ds"), "train"))
    assert {r["source"] for r in records} == {"repository"}
    assert {"program_hash", "code", "entry", "input", "text", "frames", "return", "path",
            "test"} <= set(records[0])
    assert len({r["text"] for r in records}) == len(records)          # deduplicated
    assert stats["deadletter_reasons"] == {}


def test_source_options_set_depth_and_step_in():
    limits = repository.limits_for({"depth": 2, "stepInProbability": 0.5}, TraceLimits(seed=3))
    assert limits == TraceLimits(max_depth=2, step_in_probability=0.5, seed=3)


def test_malformed_episodes_are_dead_letters_not_crashes(tmp_path):
    """A hostile suite can write anything into the episodes file (it runs in the same process
    as the plugin): records that do not parse become dead letters."""
    repo = tmp_path / "hostile"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "test_forge.py").write_text(
        "import os\n\ndef test_forge():\n"
        "    with open(os.environ['CWM_EPISODES'], 'a') as f:\n"
        "        f.write('{\"path\": 1}\\n[]\\nnot json\\n')\n")
    out = list(repository.trace_repository({"kind": "repository", "uri": str(repo)},
                                           TraceLimits(), Limits()))
    reasons = [o["_deadletter"]["reason"] for o in out]
    assert reasons == ["malformed episode", "malformed episode"]
