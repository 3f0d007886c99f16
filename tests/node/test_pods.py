"""Proof that pods run on the test cluster's node (issue 16, item 4).

Each test creates real objects and waits for the real controllers and the kubelet: the Job
controller creates pods, the scheduler binds them, the kubelet runs them in containerd, the Job
controller writes the outcome. Nothing here writes a status. Every namespace enforces Pod Security
"restricted", so every pod is also one that a restricted namespace admits.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import yaml

from tests.controlplane import node as cwm_node
from tests.controlplane.cluster import REPO, ControlPlaneError, Kube, read_versions
from tests.controlplane.nodeimages import NONROOT_UID
from tests.node import pods

pytestmark = [pytest.mark.cluster, pytest.mark.node]


@pytest.fixture
def ns(kube_node: Kube, node_namespace: str) -> str:
    pods.restrict(node_namespace, kube_node)
    return node_namespace


def test_node_ready_and_cluster_dns_running(kube_node: Kube) -> None:
    nodes = json.loads(kube_node.kubectl("get", "nodes", "-o", "json", check=True).stdout)["items"]
    ready = [n["metadata"]["name"] for n in nodes
             if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])]
    assert ready, f"no Ready node: {kube_node.kubectl('get', 'nodes', '-o', 'wide').stdout}"
    dns = json.loads(kube_node.kubectl("get", "pods", "-n", "kube-system", "-l", "k8s-app=kube-dns",
                                       "-o", "json", check=True).stdout)["items"]
    assert any(p["status"]["phase"] == "Running" for p in dns), \
        kube_node.kubectl("get", "pods", "-A", "-o", "wide").stdout
    if kube_node.node is not None:  # our node: the versions we chose
        info = nodes[0]["status"]["nodeInfo"]
        assert info["kubeletVersion"] == read_versions()["K8S_VERSION"]
        assert info["containerRuntimeVersion"].startswith("containerd://1.6.")


def test_job_runs_to_completion_and_logs_are_readable(kube_node: Kube, ns: str) -> None:
    script = 'echo "hello from $(hostname) as $(id -u)"; test ! -w /; echo "root filesystem read-only"'
    pods.create(kube_node, ns, pods.job("hello", pods.pod_spec([pods.container("main", script)])))
    job = pods.job_finished(kube_node, ns, "hello")
    assert "Complete" in pods.conditions(job), pods.describe(kube_node, ns)
    assert job["status"]["succeeded"] == 1 and job["status"].get("completionTime")
    out = pods.logs(kube_node, ns, "job/hello")
    assert "hello from hello-" in out and f"as {NONROOT_UID}" in out and "read-only" in out


def test_failing_pod_fails_the_job(kube_node: Kube, ns: str) -> None:
    spec = pods.pod_spec([pods.container("main", "echo about to fail; exit 3")])
    pods.create(kube_node, ns, pods.job("fails", spec, backoff_limit=0))
    job = pods.job_finished(kube_node, ns, "fails")
    failed = pods.conditions(job).get("Failed")
    assert failed and failed["reason"] == "BackoffLimitExceeded", job["status"]
    pod = pods.get(kube_node, ns, "pods", "-l", "job=fails")["items"][0]
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_indexed_job_runs_every_index(kube_node: Kube, ns: str) -> None:
    script = 'echo "index $JOB_COMPLETION_INDEX of 3"'
    spec = pods.pod_spec([pods.container("part", script)])
    pods.create(kube_node, ns, pods.job("parts", spec, completions=3, parallelism=3, indexed=True))
    job = pods.job_finished(kube_node, ns, "parts")
    assert "Complete" in pods.conditions(job), pods.describe(kube_node, ns)
    assert job["status"]["completedIndexes"] == "0-2" and job["status"]["succeeded"] == 3
    seen = set()
    for pod in pods.get(kube_node, ns, "pods", "-l", "job=parts")["items"]:
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        assert pods.logs(kube_node, ns, pod["metadata"]["name"]).strip() == f"index {index} of 3"
        seen.add(index)
    assert seen == {"0", "1", "2"}


def _volume(kube: Kube, ns: str) -> tuple[dict, Path | None]:
    """A ReadWriteOnce claim: on our node, bound to a hostPath PersistentVolume in a folder
    this test owns; on another cluster, provisioned by its default StorageClass."""
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}}}
    if kube.node is None:
        return claim, None
    folder = cwm_node.STATE_DIR / "volumes" / ns
    folder.mkdir(parents=True)
    shutil.chown(folder, NONROOT_UID, NONROOT_UID)  # hostPath gets no fsGroup: the pods' user must own it
    pv_name = f"{ns}-data"
    kube.kubectl("create", "-f", "-", check=True, input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": "16Mi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                 "claimRef": {"namespace": ns, "name": "data"},
                 "hostPath": {"path": str(folder), "type": "Directory"}}}))
    claim["spec"] |= {"storageClassName": "", "volumeName": pv_name}
    return claim, folder


def test_configmap_in_and_claim_shared_between_pods(kube_node: Kube, ns: str) -> None:
    token = uuid.uuid4().hex
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
              "data": {"message": f"token {token}"}}
    claim, folder = _volume(kube_node, ns)
    try:
        pods.create(kube_node, ns, config, claim)
        volumes = [{"name": "settings", "configMap": {"name": "settings"}},
                   {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
        mounts = [{"name": "settings", "mountPath": "/config", "readOnly": True},
                  {"name": "data", "mountPath": "/data"}]
        writer = pods.container("writer", "cat /config/message > /data/out.txt && echo wrote",
                                volumeMounts=mounts)
        pods.create(kube_node, ns, pods.job("writer", pods.pod_spec([writer], volumes)))
        assert "Complete" in pods.conditions(pods.job_finished(kube_node, ns, "writer")), pods.describe(kube_node, ns)
        reader = pods.container("reader", "cat /data/out.txt", volumeMounts=mounts[1:])
        pods.create(kube_node, ns, pods.job("reader", pods.pod_spec([reader], volumes[1:])))
        assert "Complete" in pods.conditions(pods.job_finished(kube_node, ns, "reader")), pods.describe(kube_node, ns)
        assert pods.logs(kube_node, ns, "job/reader").strip() == f"token {token}"
        if folder is not None:  # the bytes really are on the volume, not in a container layer
            assert (folder / "out.txt").read_text().strip() == f"token {token}"
    finally:
        if folder is not None:
            kube_node.kubectl("delete", "-n", ns, "jobs", "--all", "--wait=true", "--timeout=60s")
            kube_node.kubectl("delete", "pv", f"{ns}-data", "--wait=false")
            shutil.rmtree(folder, ignore_errors=True)


def _server(token: str) -> list[dict]:
    """A pod serving `token` over HTTP on 8080 (busybox httpd), a ClusterIP Service `master`
    (through kube-proxy) and a headless Service `master-headless` (DNS gives the pod's IP, as for
    the Services Kubeflow's training operator makes for PyTorchJob replicas)."""
    page = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "page"},
            "data": {"index.html": token}}
    server = pods.container("httpd", "exec httpd -f -v -p 8080 -h /www",
                            volumeMounts=[{"name": "page", "mountPath": "/www", "readOnly": True}],
                            ports=[{"containerPort": 8080}],
                            readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1})
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "master", "labels": {"app": "master"}},
           "spec": pods.pod_spec([server], [{"name": "page", "configMap": {"name": "page"}}], restart="Always")}
    ports = [{"port": 8080, "targetPort": 8080}]
    services = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                 "spec": {"selector": {"app": "master"}, "ports": ports, **extra}}
                for name, extra in (("master", {}), ("master-headless", {"clusterIP": "None"}))]
    return [page, pod, *services]


def test_pods_reach_each_other_through_service_dns(kube_node: Kube, ns: str) -> None:
    token = uuid.uuid4().hex
    pods.create(kube_node, ns, *_server(token))
    kube_node.kubectl("wait", "-n", ns, "pod/master", "--for=condition=Ready", "--timeout=120s", check=True)
    names = ["master", f"master.{ns}.svc.cluster.local", "master-headless"]
    # busybox nc, not wget: Debian's static busybox wget crashes (SIGSEGV) on any URL. Each name
    # is retried for up to 30 s, as a rendezvous client would: kube-proxy and CoreDNS pick up a
    # new Service within seconds, not at once (the number of tries is printed for diagnosis).
    request = r"printf 'GET / HTTP/1.0\r\n\r\n'"
    script = "; ".join(
        f"for i in $(seq 30); do r=$({request} | nc -w 2 {n} 8080 | tail -n 1); [ -n \"$r\" ] && break; "
        f"sleep 1; done; echo {n}=$r tries=$i" for n in names)
    pods.create(kube_node, ns, pods.job("client", pods.pod_spec([pods.container("client", script)])))
    pods.job_finished(kube_node, ns, "client")
    out = pods.logs(kube_node, ns, "job/client")
    for name in names:
        assert f"{name}={token}" in out, \
            f"{name} did not answer through cluster DNS:\n{out}\n{pods.describe(kube_node, ns)}"


def _rendered_pods(ns: str, tmp_path: Path) -> list[tuple[str, dict]]:
    """(child name, Pod) for every child the operator renders for examples/tiny.yaml, made a
    cluster run the way a user would: a PVC for shared storage, the chart's default images."""
    from cwm_operator.render import render_file
    from cwm_operator.settings import Settings

    doc = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    doc["spec"]["storage"] = {"pvc": {"claimName": "cwm-data"}}
    manifest = tmp_path / "tiny-cluster.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    refs = {ref.split("/")[-1].split(":")[0]: ref for ref in cwm_node.project_image_refs()}
    settings = Settings(beam_image=refs["cwm-beam"], trainer_image=refs["cwm-trainer"])
    pods_out = []
    for child in render_file(str(manifest), ns, settings):
        if child["kind"] == "Job":
            templates = [child["spec"]["template"]]
        else:
            templates = [r["template"] for r in child["spec"]["pytorchReplicaSpecs"].values()]
        for template in templates:
            pods_out.append((child["metadata"]["name"], {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": f"{child['metadata']['name']}-", **template.get("metadata", {})},
                "spec": template["spec"]}))
    return pods_out


def test_restricted_namespace_admits_the_operators_pods(kube_node: Kube, ns: str, tmp_path: Path) -> None:
    """Server-side dry run of each rendered pod in a namespace enforcing "restricted": Pod
    Security admission runs on dry runs and names every field it refuses."""
    refused = {}
    rendered = _rendered_pods(ns, tmp_path)
    assert rendered, "render_file rendered no children for examples/tiny.yaml"
    for child, pod in rendered:
        done = kube_node.kubectl("create", "-n", ns, "--dry-run=server", "-f", "-", input=json.dumps(pod))
        if done.returncode != 0:
            refused[child] = done.stderr.strip()
    assert not refused, "Pod Security 'restricted' refuses rendered pods:\n" + "\n".join(
        f"{child}: {why}" for child, why in refused.items())
    # The control: the same dry run refuses a pod that is not restricted (so the check is real).
    root_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root"},
                "spec": {"containers": [{"name": "c", "image": rendered[0][1]["spec"]["containers"][0]["image"]}]}}
    done = kube_node.kubectl("create", "-n", ns, "--dry-run=server", "-f", "-", input=json.dumps(root_pod))
    assert done.returncode != 0 and 'violates PodSecurity "restricted:latest"' in done.stderr, done.stderr


def test_the_charts_seccomp_profile_lets_a_pod_make_a_user_namespace(kube_node: Kube, ns: str) -> None:
    """What bubblewrap needs in a step pod: under RuntimeDefault an unprivileged user namespace
    is refused; under the chart's Localhost profile (installed on our node by node.py) it is made."""
    if kube_node.node is None:
        pytest.skip("needs the chart's seccomp profile on the node: installed only on our own node")
    assert cwm_node.SECCOMP_PROFILES, "charts/cwm-operator/files/cwm-sandbox.json is missing"
    script = "unshare -U -r id -u && echo made-user-namespace"
    for name, profile in (("default", {"type": "RuntimeDefault"}),
                          ("sandbox", {"type": "Localhost", "localhostProfile": cwm_node.SECCOMP_PROFILES[0].name})):
        spec = pods.pod_spec([pods.container("main", script)])
        spec["securityContext"]["seccompProfile"] = profile
        pods.create(kube_node, ns, pods.job(name, spec))
    default, sandbox = (pods.job_finished(kube_node, ns, n) for n in ("default", "sandbox"))
    assert "Failed" in pods.conditions(default), pods.logs(kube_node, ns, "job/default")
    assert "Complete" in pods.conditions(sandbox), pods.describe(kube_node, ns)
    assert pods.logs(kube_node, ns, "job/sandbox").split() == ["0", "made-user-namespace"]


def test_job_status_cannot_be_written_by_hand_where_a_node_runs(kube_node: Kube, ns: str) -> None:
    """The lifecycle helpers of the API-only cluster refuse here: the controllers write status."""
    if kube_node.node is None:
        pytest.skip("the guard belongs to our node; an external cluster's Kube has none")
    with pytest.raises(ControlPlaneError, match="runs a node"):
        kube_node.complete_job("anything", ns)
    with pytest.raises(ControlPlaneError, match="runs a node"):
        kube_node.fail_pytorchjob("anything", ns)
