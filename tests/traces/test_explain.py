"""Explained traces (cwm_beam.explain): the filter keeps exactly the explanations whose stated
output is the traced one, through a real OpenAI-compatible HTTP server scripted with known right
and wrong explanations, run by Beam's in-process runner."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from cwm_beam.explain import (
    ExplainSettings,
    ExplainTraces,
    count_verdicts,
    kept,
    prompt,
    same_value,
    stated_output,
    verdict,
)
from cwm_exec.tracer import trace_function
from tests.scripted_endpoint import JSONHandler, chat_reply, serving

PROGRAMS = {  # id -> (code, input)
    "right": ("def f(xs):\n    out = []\n    for x in xs:\n        out.append(x * 2)\n"
              "    return out", "[1, 2]"),
    "wrong": ("def f(s):\n    return s.upper() + '!'", "'hi'"),
    "silent": ("def f(n):\n    return n % 3 == 0", "9"),
    "typed": ("def f(a, b):\n    return a > b", "2, 1"),
    "raises": ("def f(d):\n    return d['missing']", "{}"),
}
# What the scripted model answers for each program (keyed by the call in the prompt).
ANSWERS = {
    "right": "xs is [1, 2]; out gets 2, then 4.\nOutput: `[2, 4]`",
    "wrong": "s becomes 'HI' and the function adds a question mark.\nOutput: 'HI?'",
    "silent": "9 is divisible by 3, so the function returns a boolean.",
    "typed": "2 > 1 holds.\nOutput: 1",  # True is the traced value: 1 is the wrong type
}


def traced_record(name: str) -> dict:
    code, call_input = PROGRAMS[name]
    result = trace_function(code, "f", call_input)
    return {"id": name, "source": "test", "program_hash": name, "code": code, "entry": "f",
            "input": call_input, "frames": [f.to_json() for f in result.frames],
            "return": result.return_repr, "exception": result.exception,
            "truncated": result.truncated_reason is not None}


class ScriptedModel(JSONHandler):
    """``POST /v1/chat/completions`` answering from :data:`ANSWERS` by the program's call."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.read_json()
        user = body["messages"][-1]["content"]
        name = next(n for n, (code, _) in PROGRAMS.items() if code in user)
        self.server.asked.append(name)  # type: ignore[attr-defined]
        self.send_json(200, chat_reply(ANSWERS[name], body["model"]))


@pytest.fixture()
def scripted():
    with serving(ScriptedModel, asked=[]) as server:
        yield server


def test_the_filter_keeps_exactly_the_right_explanations(scripted):
    records = [traced_record(name) for name in PROGRAMS]
    settings = ExplainSettings(endpoint=f"http://127.0.0.1:{scripted.server_port}/v1",
                               model="scripted", concurrency=2)
    with TestPipeline() as p:
        pairs = (p | beam.Create(records) | ExplainTraces(settings)
                 | beam.combiners.ToList())
        assert_that(pairs | beam.Map(lambda ps: sorted(r["id"] for r in kept(ps))),
                    equal_to([["right"]]), label="kept")
        assert_that(pairs | beam.Map(count_verdicts), equal_to([{
            "kept": 1, "wrong_output": 2, "no_output_line": 1, "endpoint_error": 0,
            "request_refused": 0, "skipped": 1}]), label="counts")
    assert sorted(scripted.asked) == ["right", "silent", "typed", "wrong"]  # not "raises"


def test_an_unreachable_endpoint_is_counted_not_kept():
    records = [traced_record("right")]
    settings = ExplainSettings(endpoint="http://127.0.0.1:9/v1", model="m", timeout=5)
    with TestPipeline() as p:
        pairs = p | beam.Create(records) | ExplainTraces(settings) | beam.combiners.ToList()
        assert_that(pairs | beam.Map(lambda ps: [kind for kind, _ in ps]),
                    equal_to([["endpoint_error"]]))


def test_kept_record_carries_the_question_and_the_explanation():
    record = traced_record("right")
    assert verdict(ANSWERS["right"], record) == "kept"
    question = prompt(record)[1]["content"]
    assert "f([1, 2])" in question and "out = [2]" in question  # the trace's steps are shown


@pytest.mark.parametrize(("stated", "traced", "same"), [
    ("[2, 4]", "[2, 4]", True),
    ("[2,4]", "[2, 4]", True),           # spacing is not the value
    ("True", "True", True),
    ("1", "True", False),                # equal in Python, not the same output
    ("[1]", "[True]", False),
    ("1.0", "1", False),
    ("'a'", "'a'", True),
    ("a", "'a'", False),                 # an unquoted string is not the literal
    ("<Foo object>", "<Foo object>", True),  # not a literal: the same text
])
def test_same_value(stated, traced, same):
    assert same_value(stated, traced) is same


def test_stated_output_takes_the_last_output_line():
    assert stated_output("Output: 1\nthen again\n**Output:** `2`\n") == "2"
    assert stated_output("no answer here") is None


def test_settings_name_the_bad_field():
    with pytest.raises(ValueError, match="explain.endpoint"):
        ExplainSettings(endpoint="localhost:8000", model="m")
    with pytest.raises(ValueError, match="explain.model"):
        ExplainSettings(endpoint="http://h/v1", model="")
