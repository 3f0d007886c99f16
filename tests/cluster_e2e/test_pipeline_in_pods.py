"""The user's path on the node-backed test cluster, end to end, with faults.

`helm install` of the chart with the images `make images` built (the operator runs as a pod under
the chart's ServiceAccount), Kubeflow's training operator reconciling the PyTorchJobs, and
examples/local-cluster.yaml applied: every step runs in pods (traces and trajectories as Indexed
Jobs of 2 pods, corpus and tokenizer as Jobs, the four stages as PyTorchJobs of a Master and a
Worker over gloo), artifacts on a hostPath PersistentVolume.

One pipeline run carries three of the faults, to keep the run time down on two cores:
- after pretrain's first checkpoint its Worker pod is deleted: the training operator recreates
  it, the Master restarts in place, and training resumes from the checkpoint (step numbers);
- while midtrain runs the operator pod is deleted: the Deployment starts another, which adopts
  what exists: one child per step, no second attempt;
- at the end `kubectl delete cwmpipeline` removes every child and pod (owner references).
A second, small pipeline fails in its first step: `Failed`, the pod's log tail in the status and
in an event. Then the same spec runs embedded (`cwm run`) and its data sets and losses are
compared with the cluster's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.chart.helm import CHART
from tests.cluster_e2e import spec
from tests.cluster_e2e.observe import handoffs, metrics_losses, metrics_steps, prometheus_samples
from tests.controlplane import node as cwm_node
from tests.kubeflow.training_operator import Build, TrainingOperatorError, run

# The first test waits for the whole cluster run (the module fixture): minutes on two cores.
pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.slow, pytest.mark.timeout(1800)]

NAME, BROKEN = "local", "broken"
STEPS = ["traces", "trajectories", "corpus", "tokenizer", "pretrain", "midtrain", "sft", "rl"]
STAGES = STEPS[4:]
CWM = ("cwm.dev", "v1alpha1", "cwmpipelines")
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
UID = 65532
TRAINER_IMAGE = "ghcr.io/cwm-pipeline/cwm-trainer:0.1.0"


@dataclass
class Run:
    """What the module's one cluster run saw (the tests below assert on it)."""

    namespace: str
    volume: Path
    status: dict[str, Any] = field(default_factory=dict)
    children: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    operator_pods: list[str] = field(default_factory=list)
    operator_service_account: str = ""
    release_service_account: str = ""
    deleted_pod: str = ""
    deleted_at_step: int = 0
    master_log: str = ""
    metrics: list[str] = field(default_factory=list)   # the operator pods' /metrics, in order
    broken_status: dict[str, Any] = field(default_factory=dict)
    broken_events: list[dict[str, Any]] = field(default_factory=list)
    left_after_delete: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def step_dir(self, step: str) -> Path:
        return self.volume / self.namespace / NAME / step


def _labelled_namespace(core: Any, kube: Any, name: str, labels: dict[str, str]) -> None:
    core.create_namespace({"metadata": {"name": name, "labels": {"cwm.dev/test": "true", **labels}}})
    kube.wait_for(lambda: core.read_namespaced_service_account("default", name), 30,
                  f"namespace {name}'s default ServiceAccount")


def _helm_install(kube: Any, release: str, system: str, namespace: str) -> None:
    done = kube.helm("install", release, str(CHART), "--namespace", system, "--create-namespace",
                     "--set", f"watch.namespaces={{{namespace}}}",
                     "--set", "images.operator.pullPolicy=Never",
                     "--set", "children.imagePullPolicy=Never",
                     # the broken pipeline's retries come quickly
                     "--set", "children.retryBackoffSeconds=1",
                     "--wait", "--timeout", "180s", timeout=200)
    assert done.returncode == 0, f"helm install failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def cluster_run(kube_node: Any, node_project_images: list[str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    if kube_node.local is None:
        pytest.skip("needs the local node: the test reads the PersistentVolume's folder on this machine")
    try:
        build = Build.find()
    except TrainingOperatorError as e:
        pytest.fail(str(e), pytrace=False)
    core = client.CoreV1Api(kube_node.api_client)
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    system, release = f"{namespace}-system", f"cwm-{namespace}"
    volume = cwm_node.STATE_DIR / "volumes" / namespace
    volume.mkdir(parents=True)
    shutil.chown(volume, UID, UID)  # hostPath gets no fsGroup: the step pods' user owns it
    _labelled_namespace(core, kube_node, namespace, spec.namespace_labels())
    kube_node.apply_crd(build.crd())
    user = f"system:serviceaccount:{namespace}:training-operator"
    kubeconfig = kube_node.kubeconfig_for(user, ["system:serviceaccounts", "system:authenticated",
                                                 f"system:serviceaccounts:{namespace}"])
    result = Run(namespace, volume)
    try:
        with run(kube_node.api_client, kubeconfig, namespace, tmp_path_factory.mktemp("kubeflow"),
                 init_image=TRAINER_IMAGE, user=user) as training_operator:
            t0 = time.monotonic()
            _helm_install(kube_node, release, system, namespace)
            result.seconds["helm install"] = time.monotonic() - t0
            try:
                _drive(kube_node, result, system)
            except BaseException:
                print(training_operator.logs(60), file=sys.stderr)
                print(kube_node.kubectl("get", "all,events", "-n", namespace).stdout, file=sys.stderr)
                print(kube_node.kubectl("logs", "-n", system, "deploy/" + release + "-cwm-operator",
                                        "--tail=60").stdout, file=sys.stderr)
                raise
        yield result
    finally:
        kube_node.helm("uninstall", release, "--namespace", system)
        for ns in (namespace, system):
            core.delete_namespace(ns)
        shutil.rmtree(volume, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Driving the run


def _apply(kube: Any, docs: list[dict[str, Any]]) -> None:
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), check=True)


def _status(custom: Any, ns: str, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(*CWM[:2], ns, CWM[2], name).get("status") or {}


def _step_state(custom: Any, ns: str, name: str, step: str) -> str | None:
    return next((r["state"] for r in _status(custom, ns, name).get("steps") or [] if r["name"] == step), None)


def _operator_pod(core: Any, system: str) -> str | None:
    pods = [p for p in core.list_namespaced_pod(system).items
            if p.metadata.deletion_timestamp is None and p.status.phase == "Running"
            and all(c.ready for c in p.status.container_statuses or [])]
    return pods[0].metadata.name if len(pods) == 1 else None


def _scrape(kube: Any, system: str, pod: str) -> str:
    return kube.kubectl("get", "--raw", f"/api/v1/namespaces/{system}/pods/{pod}:9090/proxy/metrics",
                        check=True).stdout


def _drive(kube: Any, result: Run, system: str) -> None:
    ns, core = result.namespace, client.CoreV1Api(kube.api_client)
    custom = client.CustomObjectsApi(kube.api_client)
    first_operator = kube.wait_for(lambda: _operator_pod(core, system), 60, "the operator pod")
    result.operator_pods.append(first_operator)
    pod = core.read_namespaced_pod(first_operator, system)
    result.operator_service_account = pod.spec.service_account_name
    result.release_service_account = next(a.metadata.name for a in core.list_namespaced_service_account(system).items
                                          if a.metadata.name != "default")
    started = time.monotonic()
    _apply(kube, spec.cluster_documents(NAME, ns, result.volume))

    # Fault 1: pretrain's Worker pod deleted after the first checkpoint.
    latest = result.step_dir("pretrain") / "state" / "latest.json"
    kube.wait_for(lambda: latest.exists(), 900, "pretrain's first checkpoint")
    result.deleted_pod = f"{NAME}-pretrain-1-worker-0"
    core.delete_namespaced_pod(result.deleted_pod, ns, grace_period_seconds=1)
    result.deleted_at_step = max(metrics_steps(result.step_dir("pretrain") / "metrics" / "metrics.jsonl"))
    # Fault 2: the operator pod deleted while midtrain runs.
    kube.wait_for(lambda: _step_state(custom, ns, NAME, "midtrain") == "Running", 900, "midtrain to start")
    result.metrics.append(_scrape(kube, system, first_operator))
    core.delete_namespaced_pod(first_operator, system)
    second = kube.wait_for(lambda: (p := _operator_pod(core, system)) != first_operator and p, 120,
                           "a new operator pod")
    result.operator_pods.append(second)

    def finished() -> dict[str, Any] | None:
        status = _status(custom, ns, NAME)
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    result.status = kube.wait_for(finished, 1500, f"pipeline {NAME} to finish")
    result.seconds["pipeline"] = time.monotonic() - started
    result.metrics.append(_scrape(kube, system, second))
    _collect(kube, result)
    _broken(kube, result)
    _delete(kube, result)


def _collect(kube: Any, result: Run) -> None:
    ns = result.namespace
    selector = f"cwm.dev/pipeline={NAME}"
    for kind in ("jobs", "pytorchjobs"):
        result.children += json.loads(kube.kubectl("get", kind, "-n", ns, "-l", selector, "-o", "json",
                                                   check=True).stdout)["items"]
    result.pods = json.loads(kube.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json",
                                          check=True).stdout)["items"]
    result.events = [e for e in json.loads(kube.kubectl("get", "events", "-n", ns, "-o", "json",
                                                        check=True).stdout)["items"]
                     if e["involvedObject"].get("kind") == "CWMPipeline" and e["involvedObject"]["name"] == NAME]
    result.master_log = kube.kubectl("logs", "-n", ns, f"{NAME}-pretrain-1-master-0").stdout


def _broken(kube: Any, result: Run) -> None:
    ns, custom = result.namespace, client.CustomObjectsApi(kube.api_client)
    _apply(kube, [spec.broken_document(BROKEN, ns)])

    def failed() -> dict[str, Any] | None:
        status = _status(custom, ns, BROKEN)
        return status if status.get("phase") == "Failed" else None

    result.broken_status = kube.wait_for(failed, 300, f"pipeline {BROKEN} to fail")

    def warned() -> list[dict[str, Any]] | None:
        events = json.loads(kube.kubectl("get", "events", "-n", ns, "-o", "json", check=True).stdout)["items"]
        mine = [e for e in events if e["involvedObject"]["name"] == BROKEN and e["reason"] == "StepFailed"]
        return mine if any("no retries left" in e["message"] for e in mine) else None

    result.broken_events = kube.wait_for(warned, 60, "the StepFailed event")


def _delete(kube: Any, result: Run) -> None:
    """`kubectl delete cwmpipeline`: the garbage collector removes the children and their pods."""
    ns = result.namespace
    kube.kubectl("delete", "cwmpipeline", NAME, "-n", ns, "--wait=true", check=True, timeout=120)

    def leftovers() -> list[str]:
        names = []
        for kind in ("jobs", "pytorchjobs", "pods", "services"):
            names += [f"{kind}/{n}" for n in kube.kubectl(
                "get", kind, "-n", ns, "-o", "name", "-l", f"cwm.dev/pipeline={NAME}").stdout.split()]
            names += [f"{kind}/{n}" for n in kube.kubectl(
                "get", kind, "-n", ns, "-o", "name").stdout.split() if f"/{NAME}-" in n]
        return sorted(set(names))

    try:
        kube.wait_for(lambda: not leftovers(), 120, "every child and pod of the deleted pipeline to go")
    finally:
        result.left_after_delete = leftovers()


# ------------------------------------------------------------------------------------------
# The tests


def test_every_step_runs_in_pods_and_the_pipeline_succeeds(cluster_run: Run) -> None:
    r = cluster_run
    assert r.status["phase"] == "Succeeded", json.dumps(r.status, indent=1)[-4000:]
    records = {s["name"]: s for s in r.status["steps"]}
    assert list(records) == STEPS and all(s["state"] == "Succeeded" for s in records.values())
    pods_of: dict[str, list[dict[str, Any]]] = {}
    for pod in r.pods:
        pods_of.setdefault(pod["metadata"]["labels"]["cwm.dev/step"], []).append(pod)
        assert pod["spec"]["nodeName"] and pod["spec"]["securityContext"]["runAsUser"] == UID
        assert pod["status"]["phase"] == "Succeeded", pod["status"]
    # The Beam data steps: Indexed Jobs of 2 pods, one part each.
    for step in ("traces", "trajectories"):
        indexes = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
                   for p in pods_of[step]}
        assert indexes == {"0", "1"}, step
    assert len(pods_of["corpus"]) == len(pods_of["tokenizer"]) == 1
    # The stages: PyTorchJobs of a Master and a Worker, reconciled by the training operator.
    for stage in STAGES:
        roles = sorted(p["metadata"]["labels"]["training.kubeflow.org/replica-type"] for p in pods_of[stage])
        assert roles == ["master", "worker"], (stage, roles)
        env = {e["name"]: e.get("value") for e in pods_of[stage][0]["spec"]["containers"][0]["env"]}
        assert env["PET_NNODES"] == "2" and env["MASTER_ADDR"].startswith(f"{NAME}-{stage}-1-master-0")
    # Evaluation metrics of every stage landed in the status.
    for stage in STAGES:
        assert records[stage]["metrics"], (stage, records[stage])
    assert "validation_loss" in records["pretrain"]["metrics"]
    # The operator ran as a pod under the chart's ServiceAccount.
    assert r.operator_service_account == r.release_service_account


def test_events_tell_the_story(cluster_run: Run) -> None:
    reasons = [e["reason"] for e in sorted(cluster_run.events, key=lambda e: e.get("firstTimestamp") or "")]
    for reason in ("StepStarted", "StepSucceeded"):
        assert reasons.count(reason) >= len(STEPS), reasons
    assert "PipelineSucceeded" in reasons, reasons


def test_a_deleted_training_pod_is_recreated_and_training_resumes_from_the_checkpoint(cluster_run: Run) -> None:
    r = cluster_run
    steps = metrics_steps(r.step_dir("pretrain") / "metrics" / "metrics.jsonl")
    # The pod died mid-stage, and the stage ran to its end after it.
    assert 0 < r.deleted_at_step < spec.PRETRAIN_STEPS, r.deleted_at_step
    assert sorted(set(steps)) == list(range(1, spec.PRETRAIN_STEPS + 1)), steps
    # The restarted Master resumed from the checkpoint written before the pod was deleted: not
    # from step 0 (the log of its current run; the previous run's is the container's previous).
    resumed = re.search(r"resumed from \S+ at step (\d+)", r.master_log)
    assert resumed, r.master_log[-3000:]
    at = int(resumed.group(1))
    assert 0 < at <= r.deleted_at_step and at % spec.PRETRAIN_CHECKPOINT_EVERY == 0, (at, r.deleted_at_step)
    assert f"resuming at step {at}" in r.master_log
    # In place: the same attempt (the PyTorchJob restarted its pods), no second child.
    pretrain = next(s for s in r.status["steps"] if s["name"] == "pretrain")
    assert pretrain["attempts"] == 1
    master = next(p for p in r.pods if p["metadata"]["name"] == f"{NAME}-pretrain-1-master-0")
    assert master["status"]["containerStatuses"][0]["restartCount"] >= 1
    # The training operator recreated the deleted Worker under its name, after the Master began.
    worker = next(p for p in r.pods if p["metadata"]["name"] == r.deleted_pod)
    assert worker["metadata"]["creationTimestamp"] > master["metadata"]["creationTimestamp"]


def test_a_restarted_operator_creates_no_duplicate_children(cluster_run: Run) -> None:
    r = cluster_run
    assert len(r.operator_pods) == 2 and r.operator_pods[0] != r.operator_pods[1]
    names = sorted(c["metadata"]["name"] for c in r.children)
    assert names == sorted(f"{NAME}-{step}-1" for step in STEPS), names
    assert all(s["attempts"] == 1 for s in r.status["steps"]), r.status["steps"]
    for child in r.children:
        owners = child["metadata"]["ownerReferences"]
        assert [o["kind"] for o in owners] == ["CWMPipeline"] and owners[0]["name"] == NAME


def test_a_failing_step_fails_the_pipeline_with_its_log_tail(cluster_run: Run) -> None:
    status = cluster_run.broken_status
    record = next(s for s in status["steps"] if s["name"] == "traces")
    assert record["state"] == "Failed" and record["attempts"] == 3, record
    # The pod's own last words, through the kubelet's FallbackToLogsOnError termination message.
    assert "last log lines:" in record["message"] and "no-such-programs.jsonl" in record["message"], record
    failed = [c for c in status["conditions"] if c["type"] == "Failed"][0]
    assert failed["status"] == "True" and failed["reason"] == "StepFailed"
    final = next(e for e in cluster_run.broken_events if "no retries left" in e["message"])
    assert final["type"] == "Warning" and "no-such-programs.jsonl" in final["message"], final


def test_deleting_the_pipeline_removes_every_child_and_pod(cluster_run: Run) -> None:
    assert cluster_run.children and cluster_run.pods
    assert cluster_run.left_after_delete == []


def test_operator_requests_and_handoff_latency(cluster_run: Run) -> None:
    """Recorded, not timed: the numbers go to docs/benchmarks.md (printed with -s)."""
    r = cluster_run
    by_call = [prometheus_samples(text, "cwm_api_requests_total") for text in r.metrics]
    requests = [sum(calls.values()) for calls in by_call]
    handoff = [prometheus_samples(text, "cwm_child_handoff_seconds_sum") for text in r.metrics]
    counts = [prometheus_samples(text, "cwm_child_handoff_seconds_count") for text in r.metrics]
    gaps = handoffs(r.children, STEPS)
    assert len(gaps) == len(STEPS) - 1 and all(g >= 0 for g in gaps), gaps
    report = {"api_requests": requests, "by_call": by_call, "handoff_sum": handoff, "handoff_count": counts,
              "handoff_from_timestamps": gaps, "seconds": r.seconds}
    print("e2e measurements:", json.dumps(report), file=sys.stderr)
    assert sum(requests) > 0


def test_the_embedded_run_gives_the_same_data_sets_and_losses(cluster_run: Run, tmp_path: Path) -> None:
    """`cwm run` of the same spec: identical data-set manifests (traces, trajectories: records and
    digests), the same tokenizer, identical losses step by step at the same world size (2
    processes), for every stage. The corpus and rehearsal text come from the cluster run (they are
    built from the Python installation the step runs on, which differs by design)."""
    doc = spec.embedded_document(NAME, cluster_run.namespace, tmp_path / "store", cluster_run.step_dir("corpus"))
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "CWM_CACHE": os.environ.get("CWM_CACHE", str(spec.REPO / ".cache"))}
    cwm = Path(sys.executable).parent / "cwm"
    done = subprocess.run([str(cwm), "run", "--plain", "--workdir", str(tmp_path / "work"), str(manifest)],
                          capture_output=True, text=True, timeout=1500, env=env, cwd=spec.REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    local = tmp_path / "store" / NAME
    differences: dict[str, Any] = {}
    tokenizers = [(d / "tokenizer" / "tokenizer" / "tokenizer.json").read_bytes()
                  for d in (cluster_run.step_dir(""), local)]
    if tokenizers[0] != tokenizers[1]:
        differences["tokenizer"] = "tokenizer.json differs"
    for data_set in ("traces/dataset", "trajectories/dataset"):
        ours = json.loads((cluster_run.step_dir(data_set) / "manifest.json").read_text())
        theirs = json.loads((local / data_set / "manifest.json").read_text())
        # How the sandbox ran is recorded, not part of the data: in a pod bubblewrap gets no
        # procfs of its own (the runtime refuses the mount), on this machine it does.
        sandboxes = [m.get("stats", {}).pop("sandbox", None) for m in (ours, theirs)]
        print(f"{data_set} sandbox: cluster {sandboxes[0]}, embedded {sandboxes[1]}", file=sys.stderr)
        if ours != theirs:
            differences[data_set] = {k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs)
                                     if ours.get(k) != theirs.get(k)}
    for stage in STAGES:
        ours = metrics_losses(cluster_run.step_dir(stage) / "metrics" / "metrics.jsonl")
        theirs = metrics_losses(local / stage / "metrics" / "metrics.jsonl")
        if ours != theirs:
            differences[stage] = {s: (ours.get(s), theirs.get(s)) for s in sorted(set(ours) | set(theirs))
                                  if ours.get(s) != theirs.get(s)}
    assert not differences, json.dumps(differences, indent=1, default=str)[:6000]
