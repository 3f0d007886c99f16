"""``spec.model.init`` in the plan and in validation: an import step replaces tokenizer
training and is the first stage's start; what contradicts a released starting point is refused
naming the field."""

from __future__ import annotations

import copy

import pytest

from cwm_spec.plan import Target, build_plan
from cwm_spec.validation import ManifestError, parse_pipeline

BASE = {"apiVersion": "cwm.dev/v1alpha1", "kind": "CWMPipeline", "metadata": {"name": "init"},
        "spec": {"model": {"init": "s3://models/cwm/"},
                 "stages": [{"name": "midtrain"}, {"name": "sft"}, {"name": "rl"}]}}


def with_spec(**changes) -> dict:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(changes)
    return doc


def test_the_import_step_replaces_the_tokenizer_step_and_starts_the_first_stage():
    plan = build_plan(parse_pipeline(BASE), Target.local("/runs/init"))
    assert plan.names == ["traces", "trajectories", "corpus", "import", "midtrain", "sft", "rl"]
    imp = plan.step("import")
    assert imp.module == "cwm_jobs.hf_import" and imp.inputs == {"source": "s3://models/cwm"}
    assert plan.step("midtrain").inputs["init"] == imp.outputs["checkpoint"]
    for stage in ("midtrain", "sft", "rl"):
        assert plan.step(stage).inputs["tokenizer"] == imp.outputs["tokenizer"]
    assert plan.step("sft").inputs["init"] == plan.step("midtrain").outputs["checkpoint"]
    other = build_plan(parse_pipeline(with_spec(model={"init": "/models/other"})),
                       Target.local("/runs/init"))
    assert other.step("import").fingerprint != imp.fingerprint  # another checkpoint: re-import
    assert other.step("rl").fingerprint != plan.step("rl").fingerprint


@pytest.mark.parametrize("changes,field,fragment", [
    ({"stages": [{"name": "pretrain"}, {"name": "midtrain"}]}, "spec.model.init",
     "spec.stages[0] is pretrain"),
    ({"stages": [{"name": "midtrain", "initFrom": "/ckpt"}]}, "spec.stages[0].initFrom",
     "not allowed with spec.model.init"),
    ({"tokenizer": {"vocabSize": 1024}}, "spec.tokenizer.vocabSize", "tokenizer.json is used"),
    ({"tokenizer": {"uri": "/tok.json"}}, "spec.tokenizer.uri", "tokenizer.json is used"),
    ({"model": {"init": "/m", "preset": "small"}}, "spec.model", "preset: not allowed with init"),
    ({"model": {"init": "/m", "overrides": {"nLayers": 2}}}, "spec.model",
     "overrides: not allowed with init"),
    ({"model": {"init": "ftp://host/m"}}, "spec.model.init", "scheme 'ftp' is not supported"),
])
def test_contradictions_are_refused_naming_the_field(changes, field, fragment):
    with pytest.raises(ManifestError) as err:
        parse_pipeline(with_spec(**changes))
    assert any(e.path == field and fragment in e.message for e in err.value.errors), err.value
