"""Explained traces from a model behind ``cwm serve``: a checkpoint that has memorised a right
explanation of one trace and a wrong one of another, served over HTTP, explains both through
cwm_beam.explain's Beam transform; the filter keeps exactly the right one."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from cwm_beam import traces
from cwm_beam.explain import ExplainSettings, ExplainTraces, count_verdicts, kept, prompt
from cwm_model.chat import encode_segments, render_messages
from cwm_model.checkpoint import save_checkpoint
from cwm_model.model import CWM
from cwm_model.presets import get_preset
from cwm_spec import artifacts
from tests.model.conftest import memorise, single_thread
from tests.model.serving import serving
from tests.traces.test_explain import PROGRAMS, traced_record

pytestmark = pytest.mark.slow  # memorising two ~500-token chats, then a served model: ~1.5 min

# What the checkpoint learns to answer (CWM's template: reasoning, </think>, the answer).
REPLIES = {"right": "out gets 2, then 4.\n</think>\nOutput: [2, 4]",
           "wrong": "s becomes HI and gets a question mark.\n</think>\nOutput: 'HI?'"}


@pytest.fixture(scope="module")
def explainer(tmp_path_factory, tokenizer):
    """A debug-size model with a 1024-token context that has memorised :data:`REPLIES`."""
    torch.manual_seed(0)
    model = CWM(get_preset("debug", vocab_size=tokenizer.vocab_size, max_seq_len=1024,
                           rope_original_context=1024))
    sequences = []
    for name, reply in REPLIES.items():
        chat, _ = encode_segments(tokenizer, render_messages(
            prompt(traced_record(name)), add_generation_prompt=True, think=True))
        sequences.append(chat + tokenizer.encode(reply) + [tokenizer.eot_id])
    with single_thread():
        loss = memorise(model, sequences, steps=400)
    assert loss < 0.05, f"the model did not memorise its explanations (loss {loss:.3f})"
    path = tmp_path_factory.mktemp("ckpt") / "explainer"
    save_checkpoint(path, model, tokenizer, extra={"purpose": "explain test"})
    return path


@pytest.fixture(scope="module")
def served(explainer):
    with serving(explainer, "explainer") as url:
        yield url


def test_served_model_explanations_are_kept_only_when_right(served):
    records = [traced_record(name) for name in ("right", "wrong", "raises")]
    settings = ExplainSettings(endpoint=served, model="explainer", max_tokens=40,
                               concurrency=1)
    with TestPipeline() as p:
        pairs = p | beam.Create(records) | ExplainTraces(settings) | beam.combiners.ToList()
        assert_that(pairs | beam.Map(lambda ps: [(r["id"], r["explanation"]) for r in kept(ps)]),
                    equal_to([[("right", "out gets 2, then 4.\nOutput: [2, 4]")]]), label="kept")
        assert_that(pairs | beam.Map(count_verdicts), equal_to([{
            "kept": 1, "wrong_output": 1, "no_output_line": 0, "endpoint_error": 0,
            "request_refused": 0, "skipped": 1}]), label="counts")


def test_the_traces_step_explains_through_cwm_serve(served, tmp_path):
    """The traces step with ``explain`` pointed at ``cwm serve``: the same two traces, traced by
    the step in its sandbox, explained by the served model; the manifest counts the verdicts."""
    source = tmp_path / "programs.jsonl"
    source.write_text("".join(json.dumps({"id": name, "code": PROGRAMS[name][0],
                                          "input": PROGRAMS[name][1]}) + "\n"
                              for name in ("right", "wrong", "raises")))
    out = tmp_path / "out"
    traces.run(["--source", f"jsonl:{source}", "--validation-fraction", "0", "--output", str(out),
                "--workers", "1", "--explain-endpoint", served, "--explain-model", "explainer",
                "--explain-max-tokens", "40", "--explain-concurrency", "1"])
    manifest = artifacts.verify(str(out))
    assert manifest.stats["explain"] == {
        "model": "explainer", "asked": 2, "rejected": 1, "kept": 1, "wrong_output": 1,
        "no_output_line": 0, "endpoint_error": 0, "request_refused": 0, "skipped": 1}
    assert [r["id"] for r in artifacts.iter_records(str(out), "explained")] == ["jsonl/right"]
