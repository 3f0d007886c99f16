"""The operator against the test cluster with a node: its child Jobs run in real pods.

In test_scenarios.py no kubelet runs, so the tests write each child's status the way the Job
controller would. Here the Job controller, the scheduler and the kubelet (tests/controlplane/
node.py) do it: nothing writes a status by hand. The step image is the node's busybox image, which
lacks the step's program, so every pod really fails to start its command: the failure path from
pod to Job to pipeline runs for real, in seconds and without the project's images. The whole
pipeline succeeding in pods, with the operator itself as a pod, is tests/cluster_e2e.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.node import BUSYBOX_IMAGE
from tests.operator.helpers import (
    SETTINGS,
    Cluster,
    condition,
    configuration_for,
    operator_identity,
    short_manifest,
)

pytestmark = [pytest.mark.cluster, pytest.mark.node]


def test_a_step_whose_pods_fail_is_retried_then_fails_the_pipeline(kube_node: Any, node_namespace: str,
                                                                   tmp_path: Path) -> None:
    from cwm_operator.main import OperatorThread

    ns, name = node_namespace, "onnode"
    c = Cluster(kube_node, ns)
    settings = SETTINGS.fast(beam_image=BUSYBOX_IMAGE, retry_backoff_seconds=0.5, retry_backoff_max_seconds=1,
                             stuck_seconds=120)
    doc = short_manifest(name, f"file://{tmp_path}")
    doc["spec"]["data"]["resources"] = {"cpu": "100m", "memory": "64Mi"}  # the node has 2 cores
    with OperatorThread(settings, configuration_for(operator_identity(kube_node, ns)), [ns]):
        c.create(doc)
        final = c.wait_status(name, lambda s: s.get("phase") == "Failed", "Failed", timeout=180)["status"]
    failed = condition(final, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "StepFailed", final
    record = next(r for r in final["steps"] if r["name"] == "tokenizer")
    assert record["state"] == "Failed" and record["attempts"] == 3, record  # data steps retry twice
    assert "BackoffLimitExceeded" in record["message"], record
    # The Job controller wrote these outcomes from pods the kubelet really ran and saw fail.
    for attempt in (1, 2, 3):
        job = c.child(f"{name}-tokenizer-{attempt}")
        assert job is not None and job["status"].get("failed") == 1, job
        assert any(x["type"] == "Failed" and x["status"] == "True" for x in job["status"]["conditions"])
    pods = json.loads(kube_node.kubectl("get", "pods", "-n", ns, "-l", f"cwm.dev/pipeline={name}", "-o", "json",
                                        check=True).stdout)["items"]
    assert len(pods) == 3 and all(p["spec"].get("nodeName") for p in pods), pods
    for pod in pods:
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] != 0, terminated
    assert f"{name}-pretrain-1" not in c.children(name)
