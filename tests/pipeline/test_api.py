"""The CWMPipeline API: examples are valid, malformed manifests fail naming the field, the
committed CRD is the generated one, structural, and agrees with the models."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cwm_operator.cli import main as cwm
from cwm_spec.api import CWMPipeline, TraceDataSpec
from cwm_spec.crd import crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
COMMITTED_CRD = ROOT / "charts/cwm-operator/crds/cwmpipelines.cwm.dev.yaml"
MINIMAL = {
    "apiVersion": "cwm.dev/v1alpha1",
    "kind": "CWMPipeline",
    "metadata": {"name": "minimal"},
    "spec": {"stages": [{"name": "pretrain"}]},
}


def test_examples_validate(capsys):
    assert EXAMPLES, "no examples found"
    assert cwm(["validate", *map(str, EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert "examples/tiny.yaml: valid" in out and "examples/cluster.yaml: valid" in out


def test_minimal_manifest_gets_defaults():
    p = CWMPipeline.model_validate(MINIMAL)
    stage = p.spec.stages[0]
    assert p.spec.model.preset == "tiny"
    assert stage.schedule == "cosine" and stage.zero_stage == 2
    assert stage.data_mix.code == 1.0 and stage.min_learning_rate == pytest.approx(3e-5)
    assert p.spec.data.traces.sources[0].kind == "synthetic"  # CRUXEval is the evaluation's
    sft = CWMPipeline.model_validate(
        {**MINIMAL, "spec": {"stages": [{"name": "midtrain"}, {"name": "sft"}]}}
    ).spec.stages
    assert (sft[0].data_mix.cwm, sft[0].data_mix.code, sft[0].data_mix.rehearsal) == (
        0.3, 0.4, 0.3)
    assert sft[1].schedule == "constant"


def test_sections_round_trip_through_their_dump():
    p = CWMPipeline.model_validate(MINIMAL)
    dumped = p.spec.data.traces.dump()
    assert TraceDataSpec.model_validate(dumped) == p.spec.data.traces
    assert "fuzzInputsPerFunction" in dumped


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation that sets spec.a.b[0].c = value (creating mappings on the way)."""

    def apply(doc: dict) -> None:
        node: Any = doc
        parts = path.replace("]", "").replace("[", ".").split(".")
        for part in parts[:-1]:
            key: Any = int(part) if part.isdigit() else part
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]
        last = parts[-1]
        node[int(last) if last.isdigit() else last] = value

    return apply


FOUR = [{"name": n} for n in ("pretrain", "midtrain", "sft", "rl")]

# RL misconfigurations that used to fail only when the rl stage started, hours into a run; now
# `cwm validate` refuses them (and the CRD's CEL rules: tests/pipeline/test_admission.py).
RL_MISCONFIGURED = [
    ("rl-zero-stage-3", _set("spec.stages", [{"name": "pretrain"}, {"name": "rl", "zeroStage": 3}]),
     "spec.stages[1].zeroStage", "cannot use zeroStage 3"),
    ("rl-without-traces",
     lambda d: d["spec"].update(stages=[{"name": "rl"}], data={"traces": {"enabled": False}}),
     "spec.data.traces.enabled", "rl stage needs trace data"),
    ("rl-mutate-fix-without-trajectories",
     lambda d: d["spec"].update(stages=[{"name": "rl", "rl": {"tasks": ["mutate_fix"]}}],
                                data={"trajectories": {"enabled": False}}),
     "spec.stages[0].rl.tasks", "needs trajectory data"),
    ("rl-async-without-lag",
     _set("spec.stages", [{"name": "rl", "rl": {"maxPolicyLag": 0, "rolloutsAhead": 1}}]),
     "spec.stages[0].rl.maxPolicyLag", "drops every batch sampled ahead"),
    ("rl-more-updates-than-samples",
     _set("spec.stages", [{"name": "rl", "gradientAccumulation": 2,
                           "rl": {"updatesPerBatch": 4, "promptsPerStep": 1, "groupSize": 4}}]),
     "spec.stages[0].rl.updatesPerBatch", "some optimiser steps would get no sample"),
]

# (id, mutation, the field path the error must name, a fragment of the message)
MALFORMED = [
    ("wrong-api-version", _set("apiVersion", "cwm.dev/v1"), "apiVersion", "must be"),
    ("wrong-kind", _set("kind", "Pipeline"), "kind", "must be"),
    ("bad-name", _set("metadata.name", "Tiny_Run"), "metadata.name", "DNS-1123"),
    ("long-name", _set("metadata.name", "a" * 41), "metadata.name", "at most 40"),
    ("no-stages", _set("spec.stages", []), "spec.stages", "at least 1"),
    ("unknown-stage", _set("spec.stages", [{"name": "finetune"}]), "spec.stages[0].name",
     "'pretrain', 'midtrain', 'sft' or 'rl'"),
    ("duplicate-stage", _set("spec.stages", [{"name": "pretrain"}, {"name": "pretrain"}]),
     "spec.stages", "appears 2 times"),
    ("stage-order", _set("spec.stages", [{"name": "sft"}, {"name": "pretrain"}]),
     "spec.stages", "must follow"),
    ("negative-steps", _set("spec.stages[0].steps", -5), "spec.stages[0].steps",
     "greater than or equal to 1"),
    ("steps-wrong-type", _set("spec.stages[0].steps", "many"), "spec.stages[0].steps",
     "valid integer"),
    ("unknown-field", _set("spec.stages[0].epochs", 3), "spec.stages[0].epochs", "unknown field"),
    ("unknown-top-field", _set("spec.gpus", 8), "spec.gpus", "unknown field"),
    ("zero-stage-4", _set("spec.stages[0].zeroStage", 4), "spec.stages[0].zeroStage",
     "less than or equal to 3"),
    ("bad-schedule", _set("spec.stages[0].schedule", "linear"), "spec.stages[0].schedule",
     "'cosine' or 'constant'"),
    ("warmup-beyond-steps", _set("spec.stages[0].warmupSteps", 500), "spec.stages[0]",
     "exceeds steps"),
    ("rl-settings-on-sft", _set("spec.stages", [{"name": "sft", "rl": {"groupSize": 4}}]),
     "spec.stages[0]", "only valid on the rl stage"),
    ("group-size-1", _set("spec.stages", [{"name": "rl", "rl": {"groupSize": 1}}]),
     "spec.stages[0].rl.groupSize", "greater than or equal to 2"),
    ("bad-preset", _set("spec.model.preset", "70b"), "spec.model.preset", "'debug'"),
    ("bad-storage-uri", _set("spec.storage.uri", "bucket/path"), "spec.storage.uri",
     "not a URI"),
    ("bad-storage-scheme", _set("spec.storage.uri", "ftp://host/x"), "spec.storage.uri",
     "not supported"),
    ("storage-uri-and-pvc", _set("spec.storage", {"uri": "s3://b/p", "pvc": {"claimName": "x"}}),
     "spec.storage", "not both"),
    ("bad-claim-name", _set("spec.storage.pvc", {"claimName": "My Claim"}),
     "spec.storage.pvc.claimName", "DNS-1123"),
    ("missing-image-for-cluster", _set("spec.storage.uri", "s3://bucket/cwm"),
     "spec.stages[0].resources.image", "no image for the pretrain stage"),
    ("bad-cpu-quantity", _set("spec.stages[0].resources.cpu", "two"),
     "spec.stages[0].resources.cpu", "not a Kubernetes quantity"),
    ("negative-gpus", _set("spec.stages[0].resources.gpusPerNode", -1),
     "spec.stages[0].resources.gpusPerNode", "greater than or equal to 0"),
    ("jsonl-source-without-uri", _set("spec.data.traces.sources", [{"kind": "jsonl"}]),
     "spec.data.traces.sources[0]", "uri is required"),
    ("unknown-source-kind", _set("spec.data.traces.sources", [{"kind": "github"}]),
     "spec.data.traces.sources[0].kind", "'cruxeval'"),
    ("bad-mutation-family", _set("spec.data.trajectories.mutationFamilies", ["typo"]),
     "spec.data.trajectories.mutationFamilies[0]", "'body_removal'"),
    ("unpinned-pypi-repo", _set("spec.data.trajectories.repositories", [{"pypi": "toolz"}]),
     "spec.data.trajectories.repositories[0]", "pinned"),
    ("openai-policy-without-endpoint", _set("spec.data.trajectories.policy", {"kind": "openai"}),
     "spec.data.trajectories.policy", "endpoint and model are required"),
    ("validation-fraction-1", _set("spec.data.traces.validationFraction", 1.0),
     "spec.data.traces.validationFraction", "less than 1"),
    ("all-zero-mix", _set("spec.stages[0].dataMix", {"cwm": 0, "code": 0}),
     "spec.stages[0].dataMix", "at least one weight"),
    ("init-from-on-second-stage",
     _set("spec.stages", [{"name": "pretrain"}, {"name": "sft", "initFrom": "s3://b/c"}]),
     "spec.stages", "initFrom is only allowed on the first stage"),
    ("cwm-mix-without-data",
     lambda d: d["spec"].update(stages=[{"name": "midtrain"}], data={
         "traces": {"enabled": False}, "trajectories": {"enabled": False}}),
     "spec", "both data.traces and data.trajectories are disabled"),
    ("suspend-not-bool", _set("spec.suspend", "maybe"), "spec.suspend", "valid boolean"),
    *RL_MISCONFIGURED,
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_names_the_field(case, tmp_path, capsys):
    _, mutate, path, fragment = case
    doc = copy.deepcopy(MINIMAL)
    mutate(doc)
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    assert cwm(["validate", str(manifest)]) == 1
    err = capsys.readouterr().err
    lines = [ln.strip() for ln in err.splitlines()]
    assert any(ln.startswith(f"{path}:") and fragment in ln for ln in lines), err


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    manifest = tmp_path / "broken.yaml"
    manifest.write_text("apiVersion: cwm.dev/v1alpha1\nspec:\n  stages: [\n")
    assert cwm(["validate", str(manifest)]) == 1
    assert "invalid YAML: line" in capsys.readouterr().err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert cwm(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The CRD


def test_committed_crd_is_the_generated_one():
    assert COMMITTED_CRD.read_text() == crd_yaml(), (
        "the committed CRD is stale: run `cwm crd > charts/cwm-operator/crds/"
        "cwmpipelines.cwm.dev.yaml`"
    )


def _walk(node: dict, path: str, visit: Callable[[dict, str], None]) -> None:
    visit(node, path)
    for name, child in node.get("properties", {}).items():
        _walk(child, f"{path}.{name}", visit)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], f"{path}[]", visit)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], f"{path}{{}}", visit)


def test_crd_schema_is_structural_and_described():
    doc = yaml.safe_load(COMMITTED_CRD.read_text())
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {
        "Phase", "Step", "Progress", "Succeeded", "Age"}
    schema = version["schema"]["openAPIV3Schema"]
    problems: list[str] = []

    def visit(node: dict, path: str) -> None:
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "const", "$defs"):
            if banned in node:
                problems.append(f"{path}: {banned}")
        if "type" not in node and not node.get("x-kubernetes-int-or-string"):
            problems.append(f"{path}: untyped")
        if node.get("type") == "object" and path != ".metadata" and not (
            "properties" in node or "additionalProperties" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
        ):
            problems.append(f"{path}: open object")
        if path.count(".") > 1 and "description" not in node and not path.endswith(("[]", "{}")):
            problems.append(f"{path}: no description")

    _walk(schema["properties"]["spec"], ".spec", visit)
    _walk(schema["properties"]["status"], ".status", visit)
    assert not problems, problems
    stages = schema["properties"]["spec"]["properties"]["stages"]
    assert stages["x-kubernetes-list-type"] == "map"


def openapi_to_jsonschema(node: Any) -> Any:
    """The CRD's OpenAPI v3.0 schema as JSON Schema draft 4 (same boolean exclusiveMinimum),
    with strict field validation: unknown fields rejected, as `kubectl apply` does."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        out["type"] = [out["type"], "null"] if isinstance(out.get("type"), str) else out["type"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft4Validator:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(openapi_to_jsonschema(schema))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_examples_validate_against_the_crd_schema(example, crd_validator):
    # an example may carry what it needs beside the pipeline (a Namespace, a PVC)
    [doc] = [d for d in yaml.safe_load_all(example.read_text()) if d and d["kind"] == "CWMPipeline"]
    errors = [e.message for e in crd_validator.iter_errors(doc)]
    assert not errors
    # and as the API server stores it: with every default filled in
    stored = CWMPipeline.model_validate(doc).model_dump(mode="json", by_alias=True,
                                                       exclude_none=True)
    assert not [e.message for e in crd_validator.iter_errors(stored)]


SCHEMA_LEVEL = {"negative-steps", "steps-wrong-type", "unknown-field", "unknown-top-field",
                "zero-stage-4", "bad-schedule", "group-size-1", "bad-preset", "negative-gpus",
                "unknown-source-kind", "bad-mutation-family", "validation-fraction-1",
                "suspend-not-bool", "unknown-stage", "no-stages"}


@pytest.mark.parametrize("case", [c for c in MALFORMED if c[0] in SCHEMA_LEVEL],
                         ids=sorted(SCHEMA_LEVEL, key=[c[0] for c in MALFORMED].index))
def test_crd_schema_rejects_what_the_models_reject(case, crd_validator):
    doc = copy.deepcopy(MINIMAL)
    case[1](doc)
    assert list(crd_validator.iter_errors(doc)), f"the CRD accepts {case[0]}"
