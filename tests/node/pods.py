"""Helpers for the pod proofs: restricted pod specs, waiting for Jobs, reading logs.

Every pod these tests run passes Pod Security "restricted" (non-root, RuntimeDefault seccomp, no
privilege escalation, all capabilities dropped, read-only root filesystem), and every test
namespace enforces that level, so each proof is also a proof that restricted pods run here.
Objects are plain dicts; the kubernetes client and kubectl are the only I/O.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.controlplane.cluster import Kube
from tests.controlplane.node import BUSYBOX_IMAGE
from tests.controlplane.nodeimages import NONROOT_UID

Obj = dict[str, Any]

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}


def restrict(namespace: str, kube: Kube) -> None:
    """Label `namespace` to enforce Pod Security "restricted" (the API server then refuses any
    pod that is not)."""
    kube.kubectl("label", "namespace", namespace, "--overwrite",
                 *(f"{k}={v}" for k, v in RESTRICTED.items()), check=True)


def container(name: str, script: str, **extra: Any) -> Obj:
    """A busybox container running `script` with `sh -c`, restricted-compliant."""
    return {
        "name": name, "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/sh", "-c", script],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        **extra,
    }


def pod_spec(containers: list[Obj], volumes: list[Obj] | None = None, restart: str = "Never") -> Obj:
    return {
        "restartPolicy": restart,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 1,
        "securityContext": {"runAsNonRoot": True, "runAsUser": NONROOT_UID, "runAsGroup": NONROOT_UID,
                            "fsGroup": NONROOT_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": containers,
        "volumes": volumes or [],
    }


def job(name: str, spec: Obj, *, completions: int = 1, parallelism: int = 1, indexed: bool = False,
        backoff_limit: int = 0) -> Obj:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {
            "completions": completions, "parallelism": parallelism, "backoffLimit": backoff_limit,
            **({"completionMode": "Indexed"} if indexed else {}),
            "activeDeadlineSeconds": 300,
            "template": {"metadata": {"labels": {"job": name}}, "spec": spec},
        },
    }


def create(kube: Kube, namespace: str, *objects: Obj) -> None:
    """`kubectl create` the objects (server-side validation, errors raised with kubectl's words)."""
    body = "\n---\n".join(json.dumps(o) for o in objects)
    kube.kubectl("create", "-n", namespace, "-f", "-", input=body, check=True)


def get(kube: Kube, namespace: str, *what: str) -> Obj:
    return json.loads(kube.kubectl("get", "-n", namespace, *what, "-o", "json", check=True).stdout)


def job_finished(kube: Kube, namespace: str, name: str, timeout: float = 180) -> Obj:
    """Wait until the Job controller marks the Job Complete or Failed; return the Job. On a
    timeout the error carries the Job's pods and events (why it did not run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = get(kube, namespace, "job", name)
        done = {c["type"] for c in obj.get("status", {}).get("conditions", []) if c["status"] == "True"}
        if done & {"Complete", "Failed"}:
            return obj
        time.sleep(0.5)
    raise AssertionError(f"Job {namespace}/{name} did not finish in {timeout:.0f} s:\n{describe(kube, namespace)}")


def conditions(obj: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", []) if c["status"] == "True"}


def logs(kube: Kube, namespace: str, target: str, *args: str) -> str:
    """`kubectl logs` (through the API server to the kubelet, as a user would read them)."""
    return kube.kubectl("logs", "-n", namespace, target, *args, check=True).stdout


def describe(kube: Kube, namespace: str) -> str:
    """Pods and events of a namespace, for failure messages."""
    pods = kube.kubectl("get", "pods", "-n", namespace, "-o", "wide").stdout
    events = kube.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp").stdout
    return f"{pods}\n{events}"
