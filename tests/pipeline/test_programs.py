"""Program identity and decontamination rules (cwm_spec.programs, the CRUXEval split, the spec's
evaluation section and what the plan passes the data steps): pure, no data generated."""

from __future__ import annotations

import copy

import pytest

from cwm_beam.sources import cruxeval_records, cruxeval_split
from cwm_spec.api import CWMPipeline, EvaluationSpec
from cwm_spec.artifacts import Manifest, Shard, merge_stats
from cwm_spec.plan import Target, build_plan
from cwm_spec.programs import (
    contamination,
    function_source,
    program_hash,
    split_of,
    task_program_hash,
)
from cwm_spec.validation import ManifestError, parse_pipeline

BASE = {"apiVersion": "cwm.dev/v1alpha1", "kind": "CWMPipeline", "metadata": {"name": "p"},
        "spec": {"stages": [{"name": "pretrain"}, {"name": "midtrain"}]}}

MODULE = "import os\n\ndef add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"


def doc(**spec) -> dict:
    d = copy.deepcopy(BASE)
    d["spec"].update(spec)
    return d


def test_one_hash_for_one_program_whatever_its_trailing_space():
    spaced = "def f(x):\n    return x  \n\n"
    assert program_hash(spaced) == program_hash("\ndef f(x):\n    return x")
    assert program_hash("def f(x):\n    return x") != program_hash("def f(x):\n    return -x")


def test_a_mutate_fix_task_is_its_functions_original_source():
    assert function_source(MODULE, "sub") == "def sub(a, b):\n    return a - b"
    # the same function in another file, or after an unrelated edit elsewhere, is the same program
    other = MODULE.replace("import os", "import sys")
    assert task_program_hash(MODULE, "m.py", "sub") == task_program_hash(other, "n.py", "sub")
    assert task_program_hash(MODULE, "m.py", "add") != task_program_hash(MODULE, "m.py", "sub")
    # a function that cannot be read back is named by its path and name
    assert task_program_hash("def (", "m.py", "f") == program_hash("m.py::f")


def test_contamination_names_each_evaluation_and_data_set():
    evaluation = {"cruxeval": ["a" * 64, "b" * 64], "held-out traces": ["c" * 64]}
    training = {"traces/train": ["b" * 64, "d" * 64], "trajectories/train": []}
    assert contamination(evaluation, training) == [
        f"cruxeval: 1 of 2 programs in traces/train (e.g. {'b' * 12})"]
    assert contamination(evaluation, {"traces/train": ["d" * 64]}) == []


@pytest.mark.parametrize("held_out", [0, 1, 400, 799, 800])
def test_the_cruxeval_split_puts_every_program_on_one_side(held_out):
    split = cruxeval_split(held_out)
    evaluation = {program_hash(r["code"]) for r in split.evaluation}
    trainable = {program_hash(r["code"]) for r in split.trainable}
    assert len(split.evaluation) >= held_out
    assert len(split.evaluation) + len(split.trainable) == len(list(cruxeval_records()))
    assert not evaluation & trainable
    # which problems are held out does not follow the train/validation split of the traces
    if held_out == 400:
        share = sum(split_of(h, 0.5) == "validation" for h in trainable) / len(trainable)
        assert 0.35 < share < 0.65


def test_the_split_is_stable_and_nested():
    assert cruxeval_split(50).evaluation == cruxeval_split(50).evaluation
    assert cruxeval_split(50).evaluation == cruxeval_split(400).evaluation[:50]


def test_by_default_every_cruxeval_problem_is_held_out_and_a_cruxeval_source_is_refused():
    assert EvaluationSpec().cruxeval_held_out == 800
    source = {"traces": {"sources": [{"kind": "synthetic", "count": 5}, {"kind": "cruxeval"}]}}
    with pytest.raises(ManifestError, match=r"data.traces.sources\[1\]: the cruxeval source has "
                                            r"nothing to trace.*cruxevalHeldOut"):
        parse_pipeline(doc(data=source))
    parse_pipeline(doc(data=source, evaluation={"cruxevalHeldOut": 400}))


def test_the_plan_tells_the_trace_step_what_the_evaluation_holds_out():
    pipeline = parse_pipeline(doc(evaluation={"cruxevalHeldOut": 123}))
    plan = build_plan(pipeline, Target.local("/runs/p"))
    assert plan.step("traces").config["evaluation"] == {"cruxevalHeldOut": 123}
    other = build_plan(parse_pipeline(doc(evaluation={"cruxevalHeldOut": 124})),
                       Target.local("/runs/p"))
    assert other.step("traces").fingerprint != plan.step("traces").fingerprint
    assert other.step("trajectories").fingerprint == plan.step("trajectories").fingerprint


def test_rehearsal_text_is_built_beside_the_corpus_only_when_a_stage_mixes_it_in():
    plan = build_plan(parse_pipeline(doc()), Target.local("/runs/p"))   # midtrain: 0.3 rehearsal
    corpus = plan.step("corpus")
    assert set(corpus.outputs) == {"dataset", "rehearsal"}
    assert plan.step("midtrain").inputs["rehearsal"] == corpus.outputs["rehearsal"]
    assert plan.step("tokenizer").inputs["rehearsal"] == corpus.outputs["rehearsal"]
    code_only = doc(stages=[{"name": "pretrain"}, {"name": "midtrain", "dataMix": {"code": 1}}])
    plan = build_plan(parse_pipeline(code_only), Target.local("/runs/p"))
    assert set(plan.step("corpus").outputs) == {"dataset"}
    assert "rehearsal" not in plan.step("midtrain").inputs
    given = doc(data={"corpus": {"uri": "s3://b/code"}})
    plan = build_plan(parse_pipeline(given), Target.local("/runs/p"))
    assert plan.names[:4] == ["traces", "trajectories", "rehearsal", "tokenizer"]
    given["spec"]["data"]["rehearsal"] = {"uri": "s3://b/text"}
    plan = build_plan(parse_pipeline(given), Target.local("/runs/p"))
    assert "rehearsal" not in plan.names
    assert plan.step("midtrain").inputs["rehearsal"] == "s3://b/text"


def test_manifests_keep_their_program_lists_through_json_and_parts():
    a = Manifest("traces", {"train": [Shard("t", 1, 1, "x")]}, {"n": 1},
                 {"train": ["b", "a", "b"]})
    back = Manifest.from_json(a.to_json(), "a")
    assert back.programs == {"train": ["a", "b"]}
    assert Manifest.from_json({**a.to_json(), "programs": {}}, "b").programs == {}
    assert merge_stats([{"excluded_for_evaluation": {"cruxeval": 3}},
                        {"excluded_for_evaluation": {"cruxeval": 4}}]) == \
        {"excluded_for_evaluation": {"cruxeval": 7}}


def test_the_whole_spec_validates_with_the_typed_evaluation_section():
    pipeline = CWMPipeline.model_validate(doc(evaluation={"reasoningTokens": 64,
                                                          "validationSequences": 8}))
    ev = pipeline.spec.evaluation
    assert (ev.reasoning_tokens, ev.validation_sequences, ev.max_new_tokens) == (64, 8, 128)
    with pytest.raises(ManifestError, match="evaluation.validationSequences"):
        parse_pipeline(doc(evaluation={"validationSequences": 0}))
