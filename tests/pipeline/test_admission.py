"""The API server itself refuses what `cwm validate` refuses across fields: the CRD carries the
spec rules as CEL (`x-kubernetes-validations`), so `kubectl apply` of a pipeline bound to fail
hours later (an RL misconfiguration) is refused at once, naming the field."""

from __future__ import annotations

import copy

import pytest
import yaml

from cwm_spec.validation import SPEC_RULES
from tests.pipeline.test_api import MINIMAL, RL_MISCONFIGURED

pytestmark = pytest.mark.cluster


# RL_MISCONFIGURED breaks SPEC_RULES one by one, in order.
@pytest.mark.parametrize("case,rule", list(zip(RL_MISCONFIGURED, SPEC_RULES, strict=True)),
                         ids=[c[0] for c in RL_MISCONFIGURED])
def test_api_server_refuses_rl_misconfiguration(case, rule, kube, kube_namespace, tmp_path):
    name, mutate, _, fragment = case
    doc = copy.deepcopy(MINIMAL)
    doc["metadata"]["name"] = name
    mutate(doc)
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    done = kube.kubectl("apply", "-n", kube_namespace, "-f", str(manifest))
    assert done.returncode != 0, f"the API server admitted {name}"
    assert f"spec{rule.field}: " in done.stderr and fragment in done.stderr, done.stderr


def test_api_server_admits_a_valid_rl_pipeline(kube, kube_namespace, tmp_path):
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["stages"] = [{"name": "pretrain"}, {"name": "rl", "zeroStage": 2,
                                                     "rl": {"tasks": ["mutate_fix"]}}]
    manifest = tmp_path / "ok.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    done = kube.kubectl("apply", "-n", kube_namespace, "-f", str(manifest))
    assert done.returncode == 0, done.stderr
