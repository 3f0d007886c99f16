"""Shared helpers of the operator tests: manifests, the operator's identity, child drivers."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cwm_operator.permissions import cluster_role
from cwm_operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny.yaml"
PIPELINES = ("cwm.dev", "v1alpha1", "cwmpipelines")
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
STEPS = ["traces", "trajectories", "corpus", "tokenizer", "pretrain", "midtrain", "sft", "rl"]
TRAIN = {"pretrain", "midtrain", "sft", "rl"}
SETTINGS = Settings(beam_image="cwm-beam:test", trainer_image="cwm-trainer:test",
                    gpu_node_selector={"pool": "gpu"},
                    gpu_tolerations=({"key": "nvidia.com/gpu", "operator": "Exists",
                                      "effect": "NoSchedule"},))
OPERATOR_SA = "cwm-operator"
ROLE_NAME = "cwm-operator-test"


def manifest(name: str, storage: str, **spec_changes: Any) -> dict[str, Any]:
    """examples/tiny.yaml renamed, with shared storage (a file:// URI the test can write)."""
    doc = yaml.safe_load(TINY.read_text())
    doc["metadata"] = {"name": name}
    doc["spec"]["storage"] = {"uri": storage}
    doc["spec"].update(copy.deepcopy(spec_changes))
    return doc


def short_manifest(name: str, storage: str, stages: list[dict[str, Any]] | None = None,
                   **spec_changes: Any) -> dict[str, Any]:
    """A 3-step plan (tokenizer, pretrain, midtrain): no Beam steps, a corpus URI given."""
    doc = manifest(name, storage, **spec_changes)
    doc["spec"]["data"] = {"traces": {"enabled": False}, "trajectories": {"enabled": False},
                           "corpus": {"uri": f"{storage}/corpus"}}
    doc["spec"]["stages"] = stages or [
        {"name": "pretrain", "steps": 10, "warmupSteps": 1},
        {"name": "midtrain", "steps": 10, "warmupSteps": 1, "dataMix": {"code": 1.0}},
    ]
    return doc


# ----- the operator's identity: a ServiceAccount bound to exactly permissions.RULES -------------

def ensure_cluster_role(kube: Any) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    rbac = client.RbacAuthorizationV1Api(kube.api_client)
    try:
        rbac.create_cluster_role(cluster_role(ROLE_NAME))
    except ApiException as err:
        if err.status != 409:
            raise
        rbac.replace_cluster_role(ROLE_NAME, cluster_role(ROLE_NAME))


def operator_identity(kube: Any, namespace: str) -> Path:
    """A kubeconfig for ServiceAccount <namespace>/cwm-operator, bound (RoleBinding) to the
    operator's ClusterRole in that namespace; returns once RBAC lets it list pipelines."""
    from kubernetes import client

    ensure_cluster_role(kube)
    core = client.CoreV1Api(kube.api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": OPERATOR_SA}})
    client.RbacAuthorizationV1Api(kube.api_client).create_namespaced_role_binding(namespace, {
        "metadata": {"name": "cwm-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": ROLE_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": namespace}],
    })
    user = f"system:serviceaccount:{namespace}:{OPERATOR_SA}"
    groups = ("system:serviceaccounts", f"system:serviceaccounts:{namespace}",
              "system:authenticated")
    path = kube.kubeconfig_for(user, groups)
    sa = client.CustomObjectsApi(kube.serviceaccount_client(namespace, OPERATOR_SA))
    kube.wait_for(lambda: sa.list_namespaced_custom_object(*PIPELINES[:2], namespace,
                                                           PIPELINES[2]) is not None,
                  timeout=20, what="the operator's RoleBinding to take effect")
    return path


def configuration_for(kubeconfig: Path) -> Any:
    from cwm_operator.main import load_configuration

    return load_configuration(str(kubeconfig))


# ----- reading and driving the cluster ---------------------------------------------------------

class Cluster:
    """Small synchronous helpers over one namespace of the test cluster."""

    def __init__(self, kube: Any, namespace: str) -> None:
        from kubernetes import client

        self.kube, self.ns = kube, namespace
        self.custom = client.CustomObjectsApi(kube.api_client)
        self.batch = client.BatchV1Api(kube.api_client)
        self.core = client.CoreV1Api(kube.api_client)

    def create(self, doc: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(*PIPELINES[:2], self.ns, PIPELINES[2],
                                                           doc)

    def pipeline(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(*PIPELINES[:2], self.ns, PIPELINES[2],
                                                        name)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(*PIPELINES[:2], self.ns, PIPELINES[2],
                                                          name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(*PIPELINES[:2], self.ns, PIPELINES[2], name)

    def children(self, pipeline: str | None = None) -> dict[str, dict[str, Any]]:
        selector = f"cwm.dev/pipeline={pipeline}" if pipeline else "cwm.dev/pipeline"
        jobs = self.kube.api_client.sanitize_for_serialization(
            self.batch.list_namespaced_job(self.ns, label_selector=selector))["items"]
        ptjs = self.custom.list_namespaced_custom_object(
            *PYTORCHJOBS[:2], self.ns, PYTORCHJOBS[2], label_selector=selector)["items"]
        return {o["metadata"]["name"]: o for o in [*jobs, *ptjs]}

    def child(self, name: str) -> dict[str, Any] | None:
        return self.children().get(name)

    def wait_child(self, name: str, timeout: float = 20, interval: float = 0.02) -> dict[str, Any]:
        """Poll for a child by name (fine-grained: the poll interval bounds latency error)."""
        from kubernetes.client.rest import ApiException

        deadline = time.monotonic() + timeout
        step = name.rsplit("-", 2)[-2]
        while True:
            try:
                if step in TRAIN:
                    return self.custom.get_namespaced_custom_object(*PYTORCHJOBS[:2], self.ns,
                                                                    PYTORCHJOBS[2], name)
                return self.kube.api_client.sanitize_for_serialization(
                    self.batch.read_namespaced_job(name, self.ns))
            except ApiException as err:
                if err.status != 404:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"child {name} was not created within {timeout} s")
            time.sleep(interval)

    def wait_status(self, name: str, check: Callable[[dict[str, Any]], Any], what: str,
                    timeout: float = 20) -> dict[str, Any]:
        def ok() -> Any:
            obj = self.pipeline(name)
            return obj if check(obj.get("status") or {}) else None

        return self.kube.wait_for(ok, timeout=timeout, what=f"{name}: {what}")

    def complete(self, name: str) -> None:
        step = name.rsplit("-", 2)[-2]
        if step in TRAIN:
            self.kube.complete_pytorchjob(name, self.ns)
        else:
            self.kube.start_job(name, self.ns)
            self.kube.complete_job(name, self.ns)

    def fail(self, name: str, message: str = "exit code 1") -> None:
        step = name.rsplit("-", 2)[-2]
        if step in TRAIN:
            self.kube.fail_pytorchjob(name, self.ns, message=message)
        else:
            self.kube.fail_job(name, self.ns, message=message)

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(
            self.ns, field_selector=f"involvedObject.name={name},involvedObject.kind=CWMPipeline")
        return sorted((self.kube.api_client.sanitize_for_serialization(e) for e in items.items),
                      key=lambda e: e.get("firstTimestamp") or e.get("eventTime") or "")

    def reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in self.events(name)]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def write_eval(storage_dir: Path, namespace: str, pipeline: str, stage: str,
               values: dict[str, float]) -> None:
    """What a stage writes at its end: <storage>/<ns>/<pipeline>/<stage>/metrics/eval.json."""
    folder = storage_dir / namespace / pipeline / stage / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(values))


# ----- the kubeflow-training SDK's view of a PyTorchJob -----------------------------------------

def sdk_model(data: Any, klass: str) -> Any:
    """Deserialise `data` into the training SDK's model `klass`.

    The SDK's own `ApiClient.deserialize` (what `TrainingClient.get_job` uses) cannot run with
    kubernetes 37, whose pydantic models declare types as `Dict[str, str]`; so the SDK's models
    (`KubeflowOrgV1*`) are filled here by their own `openapi_types`/`attribute_map`, and the
    embedded Kubernetes models by their own `from_dict`. Unknown fields are dropped on the way,
    which is what the round-trip tests detect."""
    import re

    from kubeflow.training import models

    if data is None:
        return None
    if klass.startswith("dict("):
        sub = re.match(r"dict\(([^,]*), (.*)\)", klass).group(2)  # type: ignore[union-attr]
        return {k: sdk_model(v, sub) for k, v in data.items()}
    if klass.startswith("list["):
        sub = klass[5:-1]
        return [sdk_model(v, sub) for v in data]
    if klass in ("str", "int", "bool", "float", "object", "datetime", "date"):
        return data
    cls = getattr(models, klass)
    if cls.__module__.startswith("kubernetes."):
        return cls.from_dict(data)
    kwargs = {attr: sdk_model(data[key], cls.openapi_types[attr])
              for attr, key in cls.attribute_map.items() if key in data}
    return cls(**kwargs)


def sdk_roundtrip(obj: dict[str, Any]) -> dict[str, Any]:
    """A PyTorchJob through `KubeflowOrgV1PyTorchJob` and back to JSON."""
    from kubeflow.training.api_client import ApiClient
    from kubeflow.training.models import KubeflowOrgV1PyTorchJob

    model = sdk_model(obj, "KubeflowOrgV1PyTorchJob")
    assert isinstance(model, KubeflowOrgV1PyTorchJob)
    return ApiClient().sanitize_for_serialization(model)


# ----- load: many pipelines at once, driven by watch events ---------------------------------------

def run_load(kube: Any, namespace: str, kubeconfig: Path, storage: str, count: int,
             prefix: str = "load", settings: Settings | None = None) -> dict[str, Any]:
    """Create `count` full pipelines at once under a fresh operator; complete each child as soon
    as a watch reports it. Returns API requests, events and hand-off latencies (completion of a
    child → the watch seeing the next child's creation)."""
    import queue
    import statistics
    import threading

    from kubernetes import watch

    from cwm_operator.main import OperatorThread

    c = Cluster(kube, namespace)
    names = [f"{prefix}-{i:02d}" for i in range(count)]
    added: queue.Queue[tuple[str, float]] = queue.Queue()
    stop = threading.Event()

    def watch_children(list_fn: Any, *args: Any) -> None:
        w = watch.Watch()
        try:
            for event in w.stream(list_fn, *args, label_selector="cwm.dev/pipeline",
                                  timeout_seconds=600):
                obj = event["object"]
                if event["type"] == "ADDED":
                    name = obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name
                    if name.startswith(f"{prefix}-"):
                        added.put((name, time.monotonic()))
                if stop.is_set():
                    w.stop()
        except Exception:  # noqa: BLE001 - the stream ends when the run tears down
            if not stop.is_set():
                raise

    watchers = [
        threading.Thread(target=watch_children, args=(c.batch.list_namespaced_job, namespace),
                         daemon=True),
        threading.Thread(target=watch_children, args=(
            c.custom.list_namespaced_custom_object, *PYTORCHJOBS[:2], namespace, PYTORCHJOBS[2]),
            daemon=True),
    ]
    for t in watchers:
        t.start()
    time.sleep(0.5)  # let the watches open before anything is created
    settings = settings or SETTINGS.fast(stuck_seconds=600)
    events_before = len(c.core.list_namespaced_event(namespace).items)
    op = OperatorThread(settings, configuration_for(kubeconfig), [namespace]).start()
    started = time.monotonic()
    completed_at: dict[str, float] = {}
    latencies: list[float] = []
    try:
        for n in names:
            c.create(manifest(n, storage))
        for _ in range(count * len(STEPS)):
            child, seen = added.get(timeout=120)
            pipeline, step, _ = child.rsplit("-", 2)
            index = STEPS.index(step)
            if index:
                latencies.append(seen - completed_at[f"{pipeline}-{STEPS[index - 1]}"])
            c.complete(child)
            completed_at[f"{pipeline}-{step}"] = time.monotonic()
        for n in names:
            c.wait_status(n, lambda s: s.get("phase") == "Succeeded", "Succeeded", timeout=120)
        elapsed = time.monotonic() - started
        metrics = op.controller.metrics
        requests = metrics.total_requests()
        handoff = {s.name.rsplit("_", 1)[-1]: s.value for s in metrics.handoff.collect()[0].samples
                   if s.name.endswith(("_sum", "_count"))}
    finally:
        stop.set()
        op.stop()
    # Events are posted asynchronously by kopf; count them once they have all landed.
    expected_events = count * (2 * len(STEPS) + 1)
    kube.wait_for(lambda: len(c.core.list_namespaced_event(namespace).items) - events_before
                  >= expected_events, timeout=30, what="the events to be posted")
    events = len(c.core.list_namespaced_event(namespace).items) - events_before
    children = [n for n in c.children() if n.startswith(f"{prefix}-")]
    latencies.sort()
    return {
        "pipelines": count, "children": len(children), "seconds": elapsed,
        "requests_per_pipeline": requests / count, "events_per_pipeline": events / count,
        "latency_p50": statistics.median(latencies),
        "latency_p95": latencies[max(int(0.95 * len(latencies)) - 1, 0)],
        "latency_max": latencies[-1], "handoffs": len(latencies),
        "operator_handoff_mean": handoff.get("sum", 0.0) / max(handoff.get("count", 0.0), 1.0),
    }


def describe_load(r: dict[str, Any]) -> str:
    return (f"{r['pipelines']} pipelines × {len(STEPS)} steps in {r['seconds']:.1f} s: "
            f"{r['requests_per_pipeline']:.1f} operator API requests + "
            f"{r['events_per_pipeline']:.1f} Events per pipeline; child completion → next child "
            f"created: p50 {r['latency_p50']:.3f} s, p95 {r['latency_p95']:.3f} s, "
            f"max {r['latency_max']:.3f} s ({r['handoffs']} hand-offs; operator-side mean "
            f"{r['operator_handoff_mean']:.3f} s)")
