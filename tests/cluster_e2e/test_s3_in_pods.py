"""A pipeline on the node-backed test cluster with its artifacts in a real S3 store, and the
egress allow-list that lets its step pods reach that store and nothing else.

The store is the tests' SeaweedFS S3 gateway (tests/storage/s3server.py) listening on the node's
bridge address, outside the cluster as a user's object store would be, and pods reach it as
users reach such a store: by the DNS name of a selector-less Service whose EndpointSlice names
that address and port (examples/s3-cluster.yaml). The chart is installed with the egress rule of
charts/cwm-operator/ci/local-s3-values.yaml (the store's address and port, nothing else) in the
pipeline's namespace, kube-router enforcing it; the credentials are a Secret named by
spec.storage.secret.

One module run (the fixture):
- the example pipeline applied: traces, trajectories, corpus and tokenizer as Jobs, pretrain
  and midtrain as PyTorchJobs reconciled by Kubeflow's training operator, every input and output
  under ``s3://cwm/run/<namespace>/s3/`` (midtrain starts from pretrain's checkpoint there);
- while it runs, the proofs: pods labelled as the operator labels each kind of step pod try the
  store, another port of the store's own address, a Service of the cluster and the API Service;
  and inside the pod rendered for the traces step, the step's own process and a program it runs
  in the sandbox try the same.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import s3fs
import yaml
from kubernetes import client

from cwm_operator.render import LABEL_EGRESS, LABEL_NETWORK, render_file
from cwm_operator.settings import Settings
from tests.chart.helm import CHART
from tests.controlplane.node import KUBERNETES_SERVICE_IP, NODE_IP
from tests.kubeflow.training_operator import Build, TrainingOperatorError, run
from tests.netpol import netcheck
from tests.node import pods
from tests.storage.s3server import S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.s3, pytest.mark.slow,
              pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "s3-cluster.yaml"
VALUES = CHART / "ci" / "local-s3-values.yaml"
PROBE = Path(__file__).with_name("store_probe.py")
NAME, BUCKET, SECRET, SERVICE = "s3", "cwm", "cwm-s3-credentials", "object-store"
STEPS = ["traces", "trajectories", "corpus", "tokenizer", "pretrain", "midtrain"]
CWM = ("cwm.dev", "v1alpha1", "cwmpipelines")
TRAINER_IMAGE = "ghcr.io/cwm-pipeline/cwm-trainer:0.1.0"
#: The probe pods: the network labels the operator gives each kind of step pod (read from its
#: rendering of the example, where artifacts are remote; `sandbox`/`job` alone: on a PVC).
PROBES = {"data-step": "traces", "job-step": "tokenizer", "train-step": "pretrain"}


@dataclass
class Run:
    """What the module's one cluster run saw (the tests below assert on it)."""

    namespace: str
    server: S3Server
    status: dict[str, Any] = field(default_factory=dict)
    children: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)
    reached: dict[str, tuple[str, str]] = field(default_factory=dict)
    in_step_pod: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{BUCKET}/run/{self.namespace}/{NAME}"

    def bucket(self) -> s3fs.S3FileSystem:
        return s3fs.S3FileSystem(key=self.server.access_key, secret=self.server.secret_key,
                                 endpoint_url=self.server.endpoint, skip_instance_cache=True)


# ------------------------------------------------------------------------------------------
# The documents (pure)


def example() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def store_documents(namespace: str, port: int) -> list[dict[str, Any]]:
    """The example's Service and EndpointSlice, moved into `namespace`, the slice naming the
    server's S3 port (the example's 8333 is the by-hand server's)."""
    docs = [copy.deepcopy(d) for d in example() if d["kind"] in ("Service", "EndpointSlice")]
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
    (endpoints,) = [d for d in docs if d["kind"] == "EndpointSlice"]
    assert endpoints["endpoints"] == [{"addresses": [NODE_IP]}], endpoints
    endpoints["ports"][0]["port"] = port
    return docs


def pipeline_document(namespace: str) -> dict[str, Any]:
    doc = copy.deepcopy(next(d for d in example() if d["kind"] == "CWMPipeline"))
    doc["metadata"]["namespace"] = namespace
    assert doc["spec"]["storage"] == {"uri": f"s3://{BUCKET}/run", "secret": SECRET}
    return doc


def secret_document(server: S3Server, namespace: str) -> dict[str, Any]:
    """What the example's `kubectl create secret` makes: the server's keys, and the Service's
    DNS name as the endpoint."""
    env = {**server.env(), "AWS_ENDPOINT_URL": f"http://{SERVICE}.{namespace}.svc.cluster.local"}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": namespace},
            "stringData": env}


def values_file(namespace: str, port: int, out: Path) -> Path:
    """ci/local-s3-values.yaml for this namespace and the server's port."""
    values = yaml.safe_load(VALUES.read_text())
    (rule,) = values["networkPolicy"]["storageEgress"]
    assert rule["to"] == [{"ipBlock": {"cidr": f"{NODE_IP}/32"}}], rule
    rule["ports"][0]["port"] = port
    values["watch"]["namespaces"] = [namespace]
    out.write_text(yaml.safe_dump(values))
    return out


def rendered_templates(namespace: str, image: str, tmp: Path) -> dict[str, dict[str, Any]]:
    """The pod template the operator renders for each step of the example pipeline."""
    manifest = tmp / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump(pipeline_document(namespace)))
    out = {}
    for child in render_file(str(manifest), namespace, Settings(beam_image=image, trainer_image=image)):
        step = child["metadata"]["labels"]["cwm.dev/step"]
        spec = child["spec"]
        out[step] = copy.deepcopy(spec["template"] if child["kind"] == "Job"
                                  else spec["pytorchReplicaSpecs"]["Master"]["template"])
    return out


def network_labels(template: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in template["metadata"]["labels"].items() if k in (LABEL_NETWORK, LABEL_EGRESS)}


def step_probe_pod(template: dict[str, Any], targets: list[list[Any]]) -> dict[str, Any]:
    """The traces step's pod as rendered (labels, security context, seccomp profile, envFrom
    the Secret), its container asleep so that the probe runs in it by `kubectl exec` once the
    agent guards it, with small requests."""
    spec = template["spec"]
    step = spec["containers"][0]
    step["command"] = ["python", "-c", "import time; time.sleep(3600)"]
    step["env"] = [e for e in step["env"] if e["name"] != "CWM_STEP_CONFIG"] + [
        {"name": "CWM_OTHER_TARGETS", "value": json.dumps(targets)},
        {"name": "CWM_BUCKET", "value": BUCKET}]
    step["resources"] = {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    spec["terminationGracePeriodSeconds"] = 1
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "step-probe", "labels": network_labels(template)}, "spec": spec}


# ------------------------------------------------------------------------------------------
# The run


@pytest.fixture(scope="module")
def s3_run(kube_node: Any, node_project_images: list[str], node_s3: S3Server,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    try:
        build = Build.find()
    except TrainingOperatorError as e:
        pytest.fail(str(e), pytrace=False)
    tmp = tmp_path_factory.mktemp("s3pods")
    core = client.CoreV1Api(kube_node.api_client)
    namespace = f"s3-{uuid.uuid4().hex[:6]}"
    system, release = f"{namespace}-system", f"cwm-{namespace}"
    labels = next(d for d in example() if d["kind"] == "Namespace")["metadata"]["labels"]
    core.create_namespace({"metadata": {"name": namespace, "labels": {"cwm.dev/test": "true", **labels}}})
    kube_node.wait_for(lambda: core.read_namespaced_service_account("default", namespace), 30,
                       f"namespace {namespace}'s default ServiceAccount")
    kube_node.apply_crd(build.crd())
    user = f"system:serviceaccount:{namespace}:training-operator"
    kubeconfig = kube_node.kubeconfig_for(user, ["system:serviceaccounts", "system:authenticated",
                                                 f"system:serviceaccounts:{namespace}"])
    result = Run(namespace, node_s3)
    try:
        with run(kube_node.api_client, kubeconfig, namespace, tmp_path_factory.mktemp("kubeflow"),
                 init_image=TRAINER_IMAGE, user=user) as training_operator:
            try:
                _drive(kube_node, result, system, release, node_project_images, tmp)
            except BaseException:
                print(training_operator.logs(60), file=sys.stderr)
                print(kube_node.kubectl("get", "all,events", "-n", namespace).stdout, file=sys.stderr)
                print(kube_node.kubectl("logs", "-n", system, f"deploy/{release}-cwm-operator",
                                        "--tail=60").stdout, file=sys.stderr)
                raise
        yield result
    finally:
        kube_node.helm("uninstall", release, "--namespace", system)
        for ns in (namespace, system):
            with contextlib.suppress(client.ApiException):  # the system one: made by helm install
                core.delete_namespace(ns)


def _drive(kube: Any, result: Run, system: str, release: str, images: list[str], tmp: Path) -> None:
    ns, port = result.namespace, result.server.ports["s3"]
    t0 = time.monotonic()
    done = kube.helm("install", release, str(CHART), "--namespace", system, "--create-namespace",
                     "-f", str(values_file(ns, port, tmp / "values.yaml")),
                     "--set", "images.operator.pullPolicy=Never", "--set", "children.imagePullPolicy=Never",
                     "--wait", "--timeout", "180s", timeout=200)
    assert done.returncode == 0, f"helm install failed:\n{done.stdout}\n{done.stderr}"
    result.seconds["helm install"] = time.monotonic() - t0
    pods.create(kube, ns, *store_documents(ns, port), secret_document(result.server, ns))
    started = time.monotonic()
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(pipeline_document(ns)), check=True)
    beam = next(ref for ref in images if "/cwm-beam:" in ref)
    _probe(kube, result, rendered_templates(ns, beam, tmp))
    result.seconds["probes"] = time.monotonic() - started
    custom = client.CustomObjectsApi(kube.api_client)

    def finished() -> dict[str, Any] | None:
        status = custom.get_namespaced_custom_object(*CWM[:2], ns, CWM[2], NAME).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    result.status = kube.wait_for(finished, 1200, f"pipeline {NAME} to finish")
    result.seconds["pipeline"] = time.monotonic() - started
    selector = f"cwm.dev/pipeline={NAME}"
    for kind in ("jobs", "pytorchjobs", "pods"):
        items = pods.get(kube, ns, kind, "-l", selector)["items"]
        (result.pods if kind == "pods" else result.children).extend(items)
    result.claims = kube.kubectl("get", "pvc", "-n", ns, "-o", "name", check=True).stdout.split()
    print("s3 run seconds:", json.dumps(result.seconds), file=sys.stderr)


def _probe(kube: Any, result: Run, templates: dict[str, dict[str, Any]]) -> None:
    """Pods labelled as each kind of step pod try the store and what it must not reach."""
    ns, server = result.namespace, result.server
    probes = {name: network_labels(templates[step]) for name, step in PROBES.items()}
    probes |= {"data-step-on-pvc": {LABEL_NETWORK: "sandbox"}, "unselected": {LABEL_NETWORK: "job"}}
    filer = [NODE_IP, server.ports["filer"]]
    pods.create(kube, ns, *netcheck.server("target", uuid.uuid4().hex),
                *(netcheck.probe_pod(name, labels) for name, labels in probes.items()),
                step_probe_pod(templates["traces"], [[NODE_IP, server.ports["s3"]], filer,
                                                     [KUBERNETES_SERVICE_IP, 443]]))
    netcheck.ready(kube, ns, "target", "step-probe", *probes)
    for name in (*probes, "step-probe"):
        netcheck.wait_guarded(kube, ns, name)
    targets = {"store": (f"{SERVICE}.{ns}.svc.cluster.local", 80),
               "store address": (NODE_IP, server.ports["s3"]), "store address, other port": tuple(filer),
               "target Service": (netcheck.service_ip(kube, ns, "target"), netcheck.PORT),
               "API Service": (KUBERNETES_SERVICE_IP, 443)}
    for name in probes:
        for what, (host, port) in targets.items():
            result.reached[f"{name} -> {what}"] = netcheck.attempt(kube, ns, name, host, port)
    done = kube.kubectl("exec", "-n", ns, "step-probe", "--", "python", "-c", PROBE.read_text(),
                        timeout=180)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result.in_step_pod = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n".join(f"  {k}: {v!r}" for k, v in result.reached.items()), file=sys.stderr)
    print("in the step pod:", json.dumps(result.in_step_pod), file=sys.stderr)


# ------------------------------------------------------------------------------------------
# The tests


def test_step_pods_reach_the_store_and_nothing_else(s3_run: Run) -> None:
    """The egress allow-list, as the chart renders it from ci/local-s3-values.yaml: a pod of
    each kind of step reaches the store by its Service's name and by its address, and not the
    same address's other port (the store's filer), a Service of the cluster or the API; a
    data-step pod of a PVC pipeline (no storage label) reaches neither (nor DNS). The unselected
    pod is the control: every target answers it, so each blocked connection is the policy, not
    routing."""
    # Reached = the connection was accepted: an answer, or none and no error from nc (a peer that
    # stays silent for nc's 3 s, as the store's filer did to the control under load). Every
    # blocked connection here is refused or unresolvable, which nc reports.
    answered = {what: bool(answer) or not error for what, (answer, error) in s3_run.reached.items()}
    expected = {}
    for probe in (*PROBES, "data-step-on-pvc", "unselected"):
        for what in ("store", "store address", "store address, other port", "target Service", "API Service"):
            allowed = probe == "unselected" or (what in ("store", "store address") and probe in PROBES)
            expected[f"{probe} -> {what}"] = allowed
    assert answered == expected, json.dumps(s3_run.reached, indent=1)
    # The store's own answer (an S3 error document for an anonymous request), not a stand-in.
    assert "<Error>" in s3_run.reached["data-step -> store"][0] or \
        "<?xml" in s3_run.reached["data-step -> store"][0], s3_run.reached["data-step -> store"]


def test_a_sandboxed_program_in_a_storage_step_pod_reaches_nothing(s3_run: Run) -> None:
    """In the traces step's own pod (labels, Secret, seccomp profile as rendered): the step
    lists the bucket with the Secret's credentials and connects to the store, by its Service and
    by its address, and to nothing else; a program it runs in the sandbox, offered the step's
    whole environment, gets no credential and connects to nothing, the store included."""
    seen = s3_run.in_step_pod
    assert seen["isolation"]["mode"] == "bwrap", seen["isolation"]
    assert isinstance(seen["listed"], list), seen
    store_name, store_address, filer, api = seen["step"]
    assert [seen["step"][t] == "connected" for t in seen["step"]] == [True, True, False, False], seen["step"]
    program = seen["program"]
    assert program.get("credentials") == [], program
    assert list(program["connections"]) == [store_name, store_address, filer, api]
    assert not [t for t, r in program["connections"].items() if r == "connected"], program


def test_every_step_runs_in_pods_with_artifacts_in_the_bucket(s3_run: Run) -> None:
    r = s3_run
    assert r.status["phase"] == "Succeeded", json.dumps(r.status, indent=1)[-4000:]
    records = {s["name"]: s for s in r.status["steps"]}
    assert list(records) == STEPS and all(s["state"] == "Succeeded" for s in records.values())
    kinds = {c["metadata"]["labels"]["cwm.dev/step"]: c["kind"] for c in r.children}
    assert kinds == {**dict.fromkeys(STEPS[:4], "Job"), "pretrain": "PyTorchJob", "midtrain": "PyTorchJob"}
    for pod in r.pods:
        name, spec = pod["metadata"]["name"], pod["spec"]
        assert pod["status"]["phase"] == "Succeeded", (name, pod["status"])
        assert pod["metadata"]["labels"][LABEL_EGRESS] == "storage", name
        for container in spec["containers"]:
            assert container["envFrom"] == [{"secretRef": {"name": SECRET}}], name
    bucket = r.bucket()
    committed = ["traces/dataset/manifest.json", "trajectories/dataset/manifest.json",
                 "corpus/dataset/manifest.json", "tokenizer/tokenizer/_COMMITTED.json",
                 *(f"{stage}/{what}" for stage in ("pretrain", "midtrain")
                   for what in ("checkpoint/_COMMITTED.json", "state/latest.json",
                                "metrics/metrics.jsonl", "metrics/eval.json"))]
    missing = [path for path in committed if not bucket.exists(f"{r.prefix}/{path}")]
    assert not missing, (missing, bucket.find(r.prefix))
    evaluation = json.loads(bucket.cat_file(f"{r.prefix}/midtrain/metrics/eval.json"))
    assert evaluation and records["midtrain"]["metrics"], records["midtrain"]


def test_midtrain_reads_its_inputs_from_the_bucket_and_nothing_touches_a_volume(s3_run: Run) -> None:
    """Every pod's only volumes are emptyDirs (scratch: /tmp, /dev/shm) and no claim exists, so
    each step read what it read from the bucket, midtrain pretrain's checkpoint included."""
    r = s3_run
    assert r.claims == []
    for pod in r.pods:
        volumes = {v["name"]: sorted(set(v) - {"name"}) for v in pod["spec"]["volumes"]}
        assert all(kinds == ["emptyDir"] for kinds in volumes.values()), (pod["metadata"]["name"], volumes)
    midtrain = next(p for p in r.pods if p["metadata"]["labels"]["cwm.dev/step"] == "midtrain")
    env = {e["name"]: e.get("value") for e in midtrain["spec"]["containers"][0]["env"]}
    inputs = json.loads(env["CWM_STEP_CONFIG"])["inputs"]
    base = f"s3://{r.prefix}"
    assert inputs["init"] == f"{base}/pretrain/checkpoint", inputs
    assert all(uri.startswith(f"{base}/") for uri in inputs.values()), inputs
