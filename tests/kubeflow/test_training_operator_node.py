"""Kubeflow's training operator on the node-backed test cluster: the pods it creates for a
PyTorchJob run, its Worker's init container waits for the Master's name, the Worker reaches the
Master at MASTER_ADDR:MASTER_PORT through the operator's Service and the cluster DNS, and the
operator marks the job Succeeded from the pods' real exits. Busybox stands in for the trainer
image (a torch job over gloo is the end-to-end test's: it needs `make images`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.controlplane.node import BUSYBOX_IMAGE
from tests.kubeflow.training_operator import Build, TrainingOperatorError, watching

PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
UID = 65532


@pytest.fixture(scope="module")
def kubeflow_node(kube_node: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A restricted namespace on the node-backed cluster, watched by a training operator."""
    if kube_node.local is None:
        pytest.skip("the node-backed cluster is CWM_TEST_KUBECONFIG's: tests/kubeflow's API tests cover it")
    try:
        Build.find()
    except TrainingOperatorError as e:
        pytest.fail(str(e), pytrace=False)
    core = client.CoreV1Api(kube_node.api_client)
    namespace = f"kfn-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": namespace, "labels": {
        "cwm.dev/test": "true", "pod-security.kubernetes.io/enforce": "restricted"}}})
    kube_node.wait_for(lambda: core.read_namespaced_service_account("default", namespace), 30,
                       "the namespace's default ServiceAccount")
    try:
        with watching(kube_node, namespace, tmp_path_factory.mktemp("kubeflow-node"),
                      init_image=BUSYBOX_IMAGE, init_wait_with="nslookup") as operator:
            yield namespace, operator
    finally:
        core.delete_namespace(namespace)


def _replica(script: str) -> dict[str, Any]:
    container = {
        "name": "pytorch", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/sh", "-c", script],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }
    spec = {"automountServiceAccountToken": False, "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 1, "containers": [container],
            "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                                "seccompProfile": {"type": "RuntimeDefault"}}}
    return {"replicas": 1, "restartPolicy": "Never", "template": {"spec": spec}}


def test_worker_reaches_the_master_and_the_job_succeeds(kube_node: Any, kubeflow_node: tuple[str, Any]) -> None:
    (ns, operator), name = kubeflow_node, f"rdv-{uuid.uuid4().hex[:6]}"
    master = "nc -l -p \"$MASTER_PORT\" -w 60"  # prints what the worker sends, then exits 0
    worker = ("for i in $(seq 60); do echo \"hello rank=$RANK world=$WORLD_SIZE node_rank=$PET_NODE_RANK\" "
              "| nc -w 2 \"$MASTER_ADDR\" \"$MASTER_PORT\" && exit 0; sleep 1; done; exit 1")
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name, "namespace": ns},
           "spec": {"nprocPerNode": "1", "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None"},
                    "pytorchReplicaSpecs": {"Master": _replica(master), "Worker": _replica(worker)}}}
    custom = client.CustomObjectsApi(kube_node.api_client)
    custom.create_namespaced_custom_object(*PYTORCHJOBS[:2], ns, PYTORCHJOBS[2], job)

    def finished() -> list[str] | None:
        got = custom.get_namespaced_custom_object(*PYTORCHJOBS[:2], ns, PYTORCHJOBS[2], name)
        types = [c["type"] for c in (got.get("status") or {}).get("conditions") or [] if c["status"] == "True"]
        return types if {"Succeeded", "Failed"} & set(types) else None

    types = kube_node.wait_for(finished, 240, f"PyTorchJob {name} to finish")
    master_log = kube_node.kubectl("logs", "-n", ns, f"{name}-master-0").stdout
    worker_init = kube_node.kubectl("logs", "-n", ns, f"{name}-worker-0", "-c", "init-pytorch").stdout
    pods = kube_node.kubectl("get", "pods,svc,endpointslices", "-n", ns, "-o", "wide").stdout
    events = kube_node.kubectl("get", "events", "-n", ns, "--sort-by=.lastTimestamp").stdout
    assert "Succeeded" in types, (f"{types}\n{pods}\n{events}\nmaster: {master_log}\n"
                                  f"worker init: {worker_init[-1500:]}\noperator:\n{operator.logs(40)}")
    assert "hello rank=1 world=2 node_rank=1" in master_log, f"{master_log}\n{pods}"
    assert f"{name}-master-0" in worker_init  # the init container resolved the Master's name
