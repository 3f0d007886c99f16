"""Helpers of the NetworkPolicy proofs: the chart's own policies, a server behind a ClusterIP
Service, long-running probe pods, and connection attempts made from inside those pods with
`kubectl exec` (so a probe runs only once the agent guards its pod: see :func:`wait_guarded`).

Objects are plain dicts; kubectl, helm and iptables (to see the agent's per-pod chain) are the
only I/O.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import yaml

from tests.controlplane.cluster import REPO, Kube
from tests.node import pods

Obj = dict[str, Any]
RELEASE = "cwm"
CHART = REPO / "charts" / "cwm-operator"
PORT = 8080


def chart_policies(kube: Kube, namespace: str, storage_egress: list[Obj]) -> list[Obj]:
    """The chart's NetworkPolicies for `namespace`, rendered by `helm template` exactly as
    `helm install` would (only `networkPolicy.namespaces` and `storageEgress` set)."""
    done = kube.helm("template", RELEASE, str(CHART), "--show-only", "templates/networkpolicy.yaml",
                     "--set", f"networkPolicy.namespaces={{{namespace}}}",
                     "--set-json", f"networkPolicy.storageEgress={json.dumps(storage_egress)}",
                     check=True)
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert {d["kind"] for d in docs} == {"NetworkPolicy"} and len(docs) == 3, done.stdout
    return docs


def server(name: str, token: str, labels: Obj | None = None) -> list[Obj]:
    """A pod answering `token` over HTTP on 8080 (busybox httpd) and a ClusterIP Service `name`."""
    page = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-page"},
            "data": {"index.html": token}}
    httpd = pods.container("httpd", f"exec httpd -f -v -p {PORT} -h /www",
                           volumeMounts=[{"name": "page", "mountPath": "/www", "readOnly": True}],
                           ports=[{"containerPort": PORT}],
                           readinessProbe={"tcpSocket": {"port": PORT}, "periodSeconds": 1})
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": {"app": name, **(labels or {})}},
           "spec": pods.pod_spec([httpd], [{"name": "page", "configMap": {"name": f"{name}-page"}}],
                                 restart="Always")}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"selector": {"app": name}, "ports": [{"port": PORT, "targetPort": PORT}]}}
    return [page, pod, service]


def probe_pod(name: str, labels: Obj) -> Obj:
    """A restricted busybox pod that serves its own name on 8080 (to prove ingress rules) and
    otherwise waits: probes run in it with `kubectl exec`."""
    script = f"echo {name} > /www/index.html && exec httpd -f -p {PORT} -h /www"
    box = pods.container("probe", script, volumeMounts=[{"name": "www", "mountPath": "/www"}],
                         readinessProbe={"tcpSocket": {"port": PORT}, "periodSeconds": 1})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": pods.pod_spec([box], [{"name": "www", "emptyDir": {}}], restart="Always")}


def ready(kube: Kube, namespace: str, *names: str) -> None:
    for name in names:
        kube.kubectl("wait", "-n", namespace, f"pod/{name}", "--for=condition=Ready",
                     "--timeout=120s", check=True)


def pod_ip(kube: Kube, namespace: str, name: str) -> str:
    return pods.get(kube, namespace, "pod", name)["status"]["podIP"]


def service_ip(kube: Kube, namespace: str, name: str) -> str:
    return pods.get(kube, namespace, "service", name)["spec"]["clusterIP"]


def wait_guarded(kube: Kube, namespace: str, name: str, timeout: float = 60) -> float:
    """Wait until the agent has put pod `name` behind its own firewall chain (its rules name the
    pod and namespace in their comments); returns the seconds waited. Pods start before the
    agent has seen their address: in that window no policy holds for them (the agent reacts to
    the pod's update with its IP). On an external cluster there is no way to look: 10 s."""
    if kube.node is None:
        time.sleep(10)
        return 10.0
    started = time.monotonic()
    needle = f"traffic from POD name:{name} namespace: {namespace} "
    while time.monotonic() - started < timeout:
        rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
        if needle in rules:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"kube-router put no firewall chain in place for {namespace}/{name} in "
                         f"{timeout:.0f} s (no '{needle}' in iptables -S)")


def attempt(kube: Kube, namespace: str, pod: str, host: str, port: int = PORT) -> tuple[str, str]:
    """An HTTP GET to host:port from inside `pod`: (the last line answered, or "" when nothing
    answered; what nc said on stderr, e.g. "Connection refused" for a rejected connection)."""
    script = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port} | tail -n 1; true"
    done = kube.kubectl("exec", "-n", namespace, pod, "--", "sh", "-c", script, timeout=30)
    assert done.returncode == 0, f"kubectl exec into {pod} failed: {done.stderr}"
    return done.stdout.strip(), done.stderr.strip()


def connect(kube: Kube, namespace: str, pod: str, host: str, port: int = PORT) -> str:
    """The answer alone (see :func:`attempt`)."""
    return attempt(kube, namespace, pod, host, port)[0]


def resolve(kube: Kube, namespace: str, pod: str, name: str) -> bool:
    """Whether cluster DNS answers for `name` from inside `pod` (busybox nslookup: 3 s, one try;
    its -retry counts tries, 0 is refused as a usage error)."""
    done = kube.kubectl("exec", "-n", namespace, pod, "--", "sh", "-c",
                        f"timeout 8 nslookup -timeout=3 -retry=1 {name} >/dev/null 2>&1 "
                        "&& echo yes || echo no", timeout=30)
    return done.stdout.strip() == "yes"
