"""Kubeflow's training operator (v1.8.1, built from its Go module) against the real API server.

On the API-only control plane no pod ever runs, but everything the training operator itself does
is observable: its webhook admits (or refuses) the PyTorchJobs the cwm operator renders, and it
reconciles them into pods and Services with its own PET_*/MASTER_ADDR environment. What needs a
node (pods running, gloo between them, restarts) is issue 17's node-backed test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from cwm_operator.render import render_file
from cwm_operator.settings import Settings
from tests.controlplane.cluster import PYTORCHJOB_CRD, load_crd
from tests.kubeflow.training_operator import (
    Build,
    TrainingOperatorError,
    init_container_template,
    installed,
    watching,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local-cluster.yaml"
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
INIT_IMAGE = "ghcr.io/cwm-pipeline/cwm-trainer:0.1.0"
#: Fields the hand-written test CRD declares that v1.8.1's CRD does not (a later API version's).
NEWER_THAN_V1_8_1 = {".spec.runPolicy.managedBy"}


def _build() -> Build:
    try:
        return Build.find()
    except TrainingOperatorError as e:
        pytest.fail(str(e), pytrace=False)


def schema_types(schema: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Every property path of an OpenAPI schema with its type (`*`: map values, `[]`: items);
    below a preserved-unknown-fields object the hand-written CRD says nothing, so stop there."""
    out = {prefix or ".": schema.get("type", "preserve")}
    if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
        return out
    for name, sub in (schema.get("properties") or {}).items():
        out.update(schema_types(sub, f"{prefix}.{name}"))
    if isinstance(schema.get("additionalProperties"), dict):
        out.update(schema_types(schema["additionalProperties"], f"{prefix}.*"))
    if isinstance(schema.get("items"), dict):
        out.update(schema_types(schema["items"], f"{prefix}[]"))
    return out


def test_handwritten_crd_agrees_with_the_operators_own() -> None:
    """The API-only tests use a hand-written PyTorchJob CRD: every field it declares exists in
    the module's CRD with the same type, and names, scope, version and columns are the same."""
    upstream, ours = _build().crd(), load_crd(PYTORCHJOB_CRD)
    for key in ("group", "names", "scope"):
        assert ours["spec"][key] == upstream["spec"][key], key
    (up_version,), (our_version,) = upstream["spec"]["versions"], ours["spec"]["versions"]
    assert (our_version["name"], our_version["served"], our_version["storage"]) == ("v1", True, True)
    assert our_version["name"] == up_version["name"]
    assert our_version["additionalPrinterColumns"] == up_version["additionalPrinterColumns"]
    assert our_version["subresources"]["status"] == up_version["subresources"]["status"]
    up_types = schema_types(up_version["schema"]["openAPIV3Schema"])
    our_types = schema_types(our_version["schema"]["openAPIV3Schema"])
    differing = {p for p, t in our_types.items() if up_types.get(p) not in (t, "object") or
                 (up_types.get(p) == "object" and t not in ("object", "preserve"))}
    assert differing == NEWER_THAN_V1_8_1


def test_init_container_template_is_restricted_and_uses_a_local_image() -> None:
    (container,) = yaml.safe_load(init_container_template(INIT_IMAGE))
    assert container["image"] == INIT_IMAGE and container["command"][0] == "python3"
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]} and ctx["seccompProfile"]["type"] == "RuntimeDefault"


# ------------------------------------------------------------------------------------------
# Against the API server


@pytest.fixture(scope="module")
def kubeflow(kube: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A namespace watched by a training operator: on the local control plane, the module's CRD
    replaces the hand-written one for this module and the operator runs as a process under the
    module's ClusterRole; on CWM_TEST_KUBECONFIG's cluster, the one installed there."""
    core = client.CoreV1Api(kube.api_client)
    namespace = f"kf-{uuid.uuid4().hex[:8]}"
    # Pod Security `restricted` enforced: the pods the operator creates (with its init container)
    # are refused unless they comply.
    core.create_namespace({"metadata": {"name": namespace, "labels": {
        "cwm.dev/test": "true", "pod-security.kubernetes.io/enforce": "restricted"}}})
    try:
        if kube.local is None:
            if not installed(kube.api_client):
                pytest.fail("CWM_TEST_KUBECONFIG's cluster has no Kubeflow training operator "
                            "(install its manifests)", pytrace=False)
            yield namespace
            return
        _build()
        with watching(kube, namespace, tmp_path_factory.mktemp("kubeflow"),
                      init_image=INIT_IMAGE):
            yield namespace
    finally:
        core.delete_namespace(namespace)


def _rendered(namespace: str, step: str) -> dict[str, Any]:
    (obj,) = render_file(str(EXAMPLE), namespace, Settings(), step=step)
    return obj


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, sub in obj.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, sub in enumerate(obj) for k, v in _leaves(sub, f"{prefix}[{i}]").items()}
    return {prefix: obj}


def _env(pod: client.V1Pod) -> dict[str, str]:
    container = next(c for c in pod.spec.containers if c.name == "pytorch")
    return {e.name: e.value for e in container.env or [] if e.value is not None}


@pytest.mark.cluster
def test_operator_reconciles_the_rendered_pytorchjob(kube: Any, kubeflow: str) -> None:
    """The pretrain stage of examples/local-cluster.yaml (2 nodes, 1 process each): admitted
    unchanged by the module's schema and webhook, then a Master and a Worker pod (admitted by
    Pod Security `restricted`) and their Services created by the training operator, with its
    torchrun environment."""
    custom, core = client.CustomObjectsApi(kube.api_client), client.CoreV1Api(kube.api_client)
    job = _rendered(kubeflow, "pretrain")
    name = job["metadata"]["name"]
    stored = custom.create_namespaced_custom_object(*PYTORCHJOBS[:2], kubeflow, PYTORCHJOBS[2], job)
    sent, kept = _leaves(job), _leaves(stored)
    assert {p: v for p, v in sent.items() if kept.get(p) != v} == {}, "pruned or changed by the CRD"

    def pods() -> list[client.V1Pod] | None:
        found = core.list_namespaced_pod(kubeflow, label_selector=f"training.kubeflow.org/job-name={name}").items
        return found if len(found) == 2 else None

    by_name = {p.metadata.name: p for p in kube.wait_for(pods, 60, f"the operator to create {name}'s pods")}
    master, worker = by_name[f"{name}-master-0"], by_name[f"{name}-worker-0"]
    uid = stored["metadata"]["uid"]
    for pod in (master, worker):
        (owner,) = pod.metadata.owner_references
        assert (owner.kind, owner.uid, owner.controller) == ("PyTorchJob", uid, True)
        assert pod.status.phase == "Pending" and pod.spec.node_name is None  # no node here
        env = _env(pod)
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == f"{name}-master-0"
        assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "23456"
        assert (env["WORLD_SIZE"], env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == ("2", "2", "1")
        assert "CWM_STEP_CONFIG" in env  # the plan's environment travels unchanged
    assert (_env(master)["RANK"], _env(master)["PET_NODE_RANK"]) == ("0", "0")
    assert (_env(worker)["RANK"], _env(worker)["PET_NODE_RANK"]) == ("1", "1")
    assert [c.name for c in worker.spec.init_containers or []] == ["init-pytorch"]
    assert worker.spec.init_containers[0].image == INIT_IMAGE

    def services() -> set[str] | None:
        names = {s.metadata.name for s in core.list_namespaced_service(kubeflow).items}
        return names if {f"{name}-master-0", f"{name}-worker-0"} <= names else None

    kube.wait_for(services, 30, f"the operator to create {name}'s Services")
    svc = core.read_namespaced_service(f"{name}-master-0", kubeflow)
    assert svc.spec.cluster_ip == "None" and svc.spec.ports[0].port == 23456  # headless: pod DNS

    def created() -> list[str] | None:
        got = custom.get_namespaced_custom_object(*PYTORCHJOBS[:2], kubeflow, PYTORCHJOBS[2], name)
        types = [c["type"] for c in (got.get("status") or {}).get("conditions") or []]
        return types if "Created" in types else None

    kube.wait_for(created, 30, f"the operator to write {name}'s Created condition")


@pytest.mark.cluster
def test_webhook_refuses_what_the_operator_could_not_run(kube: Any, kubeflow: str) -> None:
    """The API server calls the operator's webhook: a PyTorchJob without a `pytorch` container
    passes the CRD's schema but is refused, in the webhook's words."""
    job = _rendered(kubeflow, "sft")
    job["metadata"]["name"] += "-renamed"
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        replica["template"]["spec"]["containers"][0]["name"] = "trainer"
    custom = client.CustomObjectsApi(kube.api_client)
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(*PYTORCHJOBS[:2], kubeflow, PYTORCHJOBS[2], job)
    assert refused.value.status in (400, 403, 422)
    assert "validator.pytorchjob.training-operator.kubeflow.org" in refused.value.body
    assert "must have at least one container with name pytorch" in refused.value.body
