"""The traces step's own hostile programs (tests/traces/hostile.py) through the Job the operator
renders, unchanged but for its claim and requests: the step's real command in a real pod on the
node (the chart's Localhost profile, ``CWM_SANDBOX=bwrap``, the chart's deny-all policy), its
data set on a PersistentVolume the test reads back.

The programs aim at what the pod holds: the claim other steps read (``write_outside``), the
step's own environment through ``/proc/1/environ`` (``read_outside``), a ClusterIP Service
backed by a real pod (``network``, retargeted from an outside address so no packet could leave
the machine).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from cwm_operator.render import render_file
from cwm_operator.settings import Settings
from cwm_spec import artifacts
from tests.controlplane import node as cwm_node
from tests.controlplane.cluster import REPO, Kube
from tests.controlplane.nodeimages import NONROOT_UID
from tests.netpol import netcheck
from tests.node import pods
from tests.traces.hostile import HOSTILE

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.slow]

OUTSIDE_ADDRESS = "('1.1.1.1', 80)"


@pytest.fixture
def ns(kube_node: Kube, node_namespace: str) -> str:
    pods.restrict(node_namespace, kube_node)
    return node_namespace


def claim_on_host(kube: Kube, ns: str) -> tuple[dict[str, Any], Path]:
    """A claim `data` bound to a hostPath PersistentVolume in a folder this test owns."""
    folder = cwm_node.STATE_DIR / "volumes" / ns
    folder.mkdir(parents=True)
    shutil.chown(folder, NONROOT_UID, NONROOT_UID)  # hostPath gets no fsGroup
    kube.kubectl("create", "-f", "-", check=True, input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{ns}-data"},
        "spec": {"capacity": {"storage": "64Mi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                 "claimRef": {"namespace": ns, "name": "data"},
                 "hostPath": {"path": str(folder), "type": "Directory"}}}))
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                     "volumeName": f"{ns}-data", "resources": {"requests": {"storage": "64Mi"}}}}, folder


def traces_job(image: str, ns: str, tmp_path: Path) -> dict[str, Any]:
    """The operator's traces Job for a pipeline whose only traces source is /data/hostile.jsonl."""
    doc = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    doc["metadata"]["name"] = "hostile"
    doc["spec"]["storage"] = {"pvc": {"claimName": "data"}}
    doc["spec"]["data"]["traces"] = {"sources": [{"kind": "jsonl", "uri": "/data/hostile.jsonl"}],
                                     "fuzzInputsPerFunction": 0, "shards": 1}
    doc["spec"]["data"]["sandbox"] = {"wallSeconds": 3, "cpuSeconds": 3}
    manifest = tmp_path / "hostile.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    for child in render_file(str(manifest), ns, Settings(beam_image=image, trainer_image=image)):
        if child["kind"] == "Job" and child["metadata"]["labels"].get("cwm.dev/step") == "traces":
            step = child["spec"]["template"]["spec"]["containers"][0]
            step["resources"] = {"requests": {"cpu": "500m", "memory": "1Gi"},
                                 "limits": {"memory": "4Gi"}}
            return child
    raise AssertionError("the operator rendered no traces Job")


def test_hostile_programs_through_the_traces_step_in_a_pod(
        kube_node: Kube, ns: str, node_project_images: list[str], tmp_path: Path) -> None:
    if kube_node.node is None:
        pytest.skip("reads the data set from a hostPath volume of our own node")
    image = next(ref for ref in node_project_images if "/cwm-beam:" in ref)
    pods.create(kube_node, ns, *netcheck.server("target", uuid.uuid4().hex),
                *netcheck.chart_policies(kube_node, ns, []))
    netcheck.ready(kube_node, ns, "target")
    target = f"('{netcheck.service_ip(kube_node, ns, 'target')}', {netcheck.PORT})"
    assert OUTSIDE_ADDRESS in HOSTILE["network"], "the network program changed: update this test"
    programs = {**HOSTILE, "network": HOSTILE["network"].replace(OUTSIDE_ADDRESS, target)}
    inputs = {"write_outside": "'/data/pwned.txt'", "read_outside": "'/proc/1/environ'"}
    claim, folder = claim_on_host(kube_node, ns)
    try:
        (folder / "hostile.jsonl").write_text("".join(
            json.dumps({"id": name, "code": code, "input": inputs.get(name, "1")}) + "\n"
            for name, code in programs.items()))
        job = traces_job(image, ns, tmp_path)
        pods.create(kube_node, ns, claim, job)
        name = job["metadata"]["name"]
        done = pods.job_finished(kube_node, ns, name, timeout=600)
        log = pods.logs(kube_node, ns, f"job/{name}")
        assert "Complete" in pods.conditions(done), log[-4000:]
        out = folder / ns / "hostile" / "traces" / "dataset"
        stats = artifacts.read_manifest(str(out)).stats
        dead = {d["id"]: d for d in artifacts.iter_records(str(out), "deadletter")}
        reasons = {n: dead.get(f"jsonl/{n}", {}).get("reason") for n in programs}
        print(f"\nsandbox recorded in the manifest: {stats.get('sandbox')}\n" +
              "\n".join(f"  traces/{n}: {r}" for n, r in reasons.items()))
        assert stats["sandbox"]["mode"] == "bwrap", stats.get("sandbox")
        assert all(reasons.values()), reasons
        assert not (folder / "pwned.txt").exists()
        kept = [r for split in ("train", "validation") for r in artifacts.iter_records(str(out), split)]
        assert not kept, kept
        assert "CWM_STEP_CONFIG" not in json.dumps(list(dead.values()))
    finally:
        kube_node.kubectl("delete", "-n", ns, "jobs", "--all", "--wait=true", "--timeout=60s")
        kube_node.kubectl("delete", "pv", f"{ns}-data", "--wait=false")
        shutil.rmtree(folder, ignore_errors=True)
