"""Trajectory records: shape checks, rendering for training, MinHash deduplication."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from cwm_beam.trajectories import Deduplicate
from cwm_forager.records import RecordError, action_text, check_record, dedup, render, solve_rates


def record(task_id, commands, success=False, family="variable_swap", repo="calc"):
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "fix it"}]
    for i, command in enumerate(commands):
        messages.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": f"c{i}", "type": "function",
             "function": {"name": "bash", "arguments": json.dumps({"command": command})}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": f"out {i}"})
    return {"id": task_id, "messages": messages,
            "meta": {"task_id": task_id, "episode_id": "e", "family": family, "repo": repo,
                     "success": success}}


A = ["python -m pytest -q tests/test_arith.py::test_gcd", "sed -n 20,30p calc/arith.py",
     "python -m pytest -q tests/test_arith.py"]
B = ["ls -la", "cat README.md", "git log --oneline | head", "grep -rn divide calc"]


def test_check_record_names_the_bad_field():
    check_record(record("t1", A))
    bad = record("t1", A)
    bad["messages"][3]["tool_call_id"] = "nope"
    with pytest.raises(RecordError, match=r"messages\[3\].tool_call_id"):
        check_record(bad)
    with pytest.raises(RecordError, match="role"):
        check_record({"messages": [{"role": "robot"}], "meta": {}})


def test_dedup_drops_near_duplicates_and_keeps_distinct_ones():
    near = A[:2] + ["python -m pytest -q tests/test_arith.py -x"]
    kept, dropped = dedup([record("t1", A), record("t2", near), record("t3", B)], threshold=0.5)
    assert [r["id"] for r in kept] == ["t1", "t3"]
    assert [r["id"] for r in dropped] == ["t2"] and dropped[0]["meta"]["duplicate_jaccard"] >= 0.5
    assert "sed -n 20,30p calc/arith.py" in action_text(record("t1", A))


def test_dedup_transform_works_per_repository():
    rows = [record("t1", A, repo="calc"), record("t2", A, repo="calc"), record("t3", A, repo="textkit")]
    with BeamTestPipeline() as p:
        out = (p | beam.Create(rows) | beam.Map(lambda r: (r["meta"]["repo"], r))
               | beam.GroupByKey() | beam.ParDo(Deduplicate(0.5)).with_outputs("duplicates", main="kept"))
        assert_that(out.kept | "KeptIds" >> beam.Map(lambda r: r["id"]), equal_to(["t1", "t3"]),
                    label="Kept")
        assert_that(out.duplicates, equal_to(["calc|variable_swap|0"]), label="Dropped")


def test_render_uses_the_model_chat_format():
    segments = render(record("t1", A))
    roles = [s.role for s in segments]
    assert "assistant" in roles and "tool" in roles
    text = "".join(s.text for s in segments)
    assert "tests/test_arith.py::test_gcd" in text and "out 2" in text


def test_solve_rates_by_family():
    rates = solve_rates([record("a", A, True), record("b", B, False),
                         record("c", A, True, family="operator_replacement")])
    assert rates["variable_swap"] == {"episodes": 2, "solved": 1, "rate": 0.5}
    assert rates["operator_replacement"]["rate"] == 1.0
