"""The cwm-operator image against the test control plane (a real kube-apiserver on loopback).

The container runs as the chart's operator pod does (uid 65532, read-only root, /tmp tmpfs, no
capabilities), as the operator's ServiceAccount with exactly the chart's RBAC rules. Two
differences, both because the API server listens on this machine's loopback, not in a cluster:
the container shares the host's network, and its credentials come from a mounted kubeconfig
(`--kubeconfig`) instead of an in-cluster token."""

from __future__ import annotations

import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.images.plans import tiny_doc
from tests.images.podrun import PodRunner, bind
from tests.operator.helpers import Cluster, operator_identity

pytestmark = [pytest.mark.images, pytest.mark.slow, pytest.mark.cluster]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def test_the_operator_image_reconciles_a_pipeline(images: dict[str, str], pod: PodRunner,
                                                  kube: Any, kube_namespace: str,
                                                  tmp_path: Path) -> None:
    secrets = tmp_path / "kubeconfig"
    secrets.mkdir()
    shutil.copy(operator_identity(kube, kube_namespace), secrets / "config")
    os.chmod(secrets / "config", 0o644)
    port = free_port()
    liveness = f"http://127.0.0.1:{port}/healthz"
    started = time.monotonic()
    container = pod.start(
        images["cwm-operator"],
        args=["--namespace", kube_namespace, f"--liveness={liveness}",
              "--kubeconfig", "/etc/cwm/config"],
        env={"CWM_BEAM_IMAGE": images["cwm-beam"], "CWM_TRAINER_IMAGE": images["cwm-trainer"]},
        mounts=[bind(str(secrets), "/etc/cwm")], network="host")

    def up() -> bool | None:
        if healthy(liveness):
            return True
        container.reload()
        if container.status == "exited":
            pytest.fail(f"the operator exited:\n{container.logs().decode()[-3000:]}")
        return None

    kube.wait_for(up, timeout=60, what="the operator's liveness endpoint")
    ready = time.monotonic() - started

    cluster = Cluster(kube, kube_namespace)
    pipeline = cluster.create(tiny_doc("in-a-container"))
    child = cluster.wait_child("in-a-container-traces-1", timeout=60)
    assert child["kind"] == "Job"
    assert child["metadata"]["ownerReferences"][0]["uid"] == pipeline["metadata"]["uid"]
    spec = child["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == images["cwm-beam"]
    assert spec.get("automountServiceAccountToken") is False
    status = cluster.wait_status("in-a-container", lambda s: s.get("currentStep") == "traces"
                                 and s.get("phase") == "Running", "running traces")["status"]
    assert status["progress"] == "0/8"

    container.stop(timeout=30)  # SIGTERM, as the kubelet sends it
    container.reload()
    logs = container.logs().decode(errors="replace")
    assert container.attrs["State"]["ExitCode"] == 0, logs[-3000:]
    print(f"\noperator container healthy {ready:.1f} s after start; reconciled the pipeline")
