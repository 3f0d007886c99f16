"""The hostile-program suite inside a step pod on the test node, in both sandbox modes the chart
offers, each case reported with what contained it (or that nothing did).

The pod is the one the operator renders for the traces step (cwm_operator.render, through the
same code path as a pipeline's Job), with the chart's NetworkPolicies in its namespace and
kube-router enforcing them:

- ``bwrap`` (the chart's default): Localhost seccomp profile ``cwm-sandbox.json`` (installed in
  the node's kubelet root by node.py, as the chart's README tells users), ``CWM_SANDBOX=bwrap``;
- ``rlimits``: RuntimeDefault seccomp, ``CWM_SANDBOX=rlimits``.

Both: uid 65532, read-only root, no capabilities, no privilege escalation, no service-account
token, labelled ``cwm.dev/network: sandbox`` (the deny-all policy). Changed from the rendered pod,
and why: the container sleeps and the suite runs in it with ``kubectl exec`` once the agent
guards the pod (a pod's first seconds, before the agent has its address, are unguarded: the
README says so); requests of 100m CPU / 1 GiB (rendered: 2 CPUs, 8 GiB: more than this node
offers beside the other pods); ``/data`` is an emptyDir (a writable volume of the pod, as the
PVC is) that an init container seeds with the victim file; a Secret mounted at ``/secrets``; the
suite's files from a ConfigMap at ``/opt/cwm-tests``.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from cwm_operator.render import render_file
from cwm_operator.settings import Settings
from tests.controlplane.cluster import REPO, Kube
from tests.controlplane.node import KUBERNETES_SERVICE_IP
from tests.netpol import netcheck
from tests.node import pods

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.slow]

SECRET = "the-secret-in-a-mounted-secret"
SHIPPED = ["tests/images/__init__.py", "tests/images/hostile_driver.py",
           "tests/trajectories/__init__.py", "tests/trajectories/test_hostile.py",
           "tests/netpol/hostile_pod.py",
           *sorted(str(p.relative_to(REPO)) for p in
                   (REPO / "tests/trajectories/fixtures/hostile").glob("*.txt"))]
#: What gets past the sandbox in `rlimits` mode (the first four: as measured in Docker by
#: tests/images/test_hostile_in_container.py; read_step_env needs the pod's shared /proc);
#: the NetworkPolicy still stops the cluster network cases.
RLIMITS_ESCAPES = {"write_outside", "read_outside", "network", "kill_parent", "read_step_env"}


@pytest.fixture
def ns(kube_node: Kube, node_namespace: str) -> str:
    pods.restrict(node_namespace, kube_node)
    return node_namespace


def suite_files() -> tuple[dict[str, Any], list[dict[str, str]]]:
    """A ConfigMap of the suite's files, and the volume items that put each at its path under
    /opt/cwm-tests (ConfigMap keys cannot hold '/')."""
    keys = {path: path.replace("/", "__") for path in SHIPPED}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cwm-tests"},
              "data": {keys[p]: (REPO / p).read_text() for p in SHIPPED}}
    return config, [{"key": keys[p], "path": p} for p in SHIPPED]


def rendered_traces_pod(image: str, mode: str, tmp_path: Path) -> dict[str, Any]:
    """The pod template the operator renders for the traces step of a small pipeline."""
    doc = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    doc["metadata"]["name"] = f"hostile-{mode}"
    doc["spec"]["storage"] = {"pvc": {"claimName": "cwm-data"}}
    doc["spec"].setdefault("evaluation", {})["cruxevalHeldOut"] = 100
    manifest = tmp_path / f"{mode}.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    settings = Settings(beam_image=image, trainer_image=image, sandbox_mode=mode)
    for child in render_file(str(manifest), "unused", settings):
        if child["kind"] == "Job" and child["metadata"]["labels"].get("cwm.dev/step") == "traces":
            return copy.deepcopy(child["spec"]["template"])
    raise AssertionError("the operator rendered no traces Job")


def hostile_pod(name: str, template: dict[str, Any], items: list[dict[str, str]],
                target: str) -> dict[str, Any]:
    """The rendered pod, changed only as the module docstring lists."""
    spec = template["spec"]
    step = spec["containers"][0]
    step["command"] = ["python", "-c", "import time; time.sleep(3600)"]
    step["env"] = [e for e in step["env"] if e["name"] != "CWM_STEP_CONFIG"] + [
        {"name": "PYTHONPATH", "value": "/opt/cwm-tests"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": "CWM_TARGET_HOST", "value": target},
        {"name": "CWM_TARGET_PORT", "value": str(netcheck.PORT)},
        {"name": "CWM_FAKE_CREDENTIAL", "value": "a credential given to the step as a variable"}]
    step["resources"] = {"requests": {"cpu": "100m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    step["volumeMounts"] += [{"name": "tests", "mountPath": "/opt/cwm-tests", "readOnly": True},
                             {"name": "secrets", "mountPath": "/secrets", "readOnly": True}]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "data"] + [
        {"name": "data", "emptyDir": {}},
        {"name": "tests", "configMap": {"name": "cwm-tests", "items": items}},
        {"name": "secrets", "secret": {"secretName": "step-secret"}}]
    seed = pods.container("seed", "mkdir -p /data/outside; echo pristine >/data/outside/victim.py",
                          volumeMounts=[{"name": "data", "mountPath": "/data"}])
    spec["initContainers"] = [seed]
    spec["restartPolicy"] = "Always"
    spec["terminationGracePeriodSeconds"] = 1
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": template["metadata"]["labels"]}, "spec": spec}


def escaped(name: str, case: dict[str, Any]) -> bool:
    """Whether the case reached anything outside its sandbox (any one side effect suffices)."""
    return bool(case.get("victim_changed") or case.get("connections") or case.get("runner_exit")
                or case.get("secret_in_output") or case.get("survivors")
                or (name in ("read_outside", "read_step_env", "network_service", "network_api")
                    and case.get("hostile_outcome") == "passed"))


def evidence(case: dict[str, Any]) -> str:
    keys = ("reason", "error", "hostile_outcome", "victim_changed", "connections", "runner_exit",
            "survivors", "memory_error", "seconds")
    shown = [k for k in keys if case.get(k) not in (None, [], False, 0)]
    return ", ".join(f"{k}={str(case[k])[:90]!r}" for k in shown)


def run_suite(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    netcheck.ready(kube, ns, name)
    waited = netcheck.wait_guarded(kube, ns, name)
    done = kube.kubectl("exec", "-n", ns, name, "--", "python", "-m", "tests.netpol.hostile_pod",
                        timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [f"{name}: guarded after {waited:.1f} s; pod {report['pod']}",
             f"  isolation {report['isolation']}", f"  step process: {report['step']}"]
    lines += [f"  {c:16} {'ESCAPED' if escaped(c, r) else 'contained'}: {evidence(r)}"
              for c, r in sorted(report["cases"].items())]
    print("\n" + "\n".join(lines))
    return report


def test_hostile_suite_in_step_pods(kube_node: Kube, ns: str, node_project_images: list[str],
                                    tmp_path: Path) -> None:
    image = next(ref for ref in node_project_images if "/cwm-beam:" in ref)
    files, items = suite_files()
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "step-secret"},
              "stringData": {"secret.txt": SECRET}}
    pods.create(kube_node, ns, *netcheck.server("target", uuid.uuid4().hex),
                *netcheck.chart_policies(kube_node, ns, []), secret, files)
    netcheck.ready(kube_node, ns, "target")
    target = netcheck.service_ip(kube_node, ns, "target")
    for mode in ("bwrap", "rlimits"):
        template = rendered_traces_pod(image, mode, tmp_path)
        pods.create(kube_node, ns, hostile_pod(f"hostile-{mode}", template, items, target))
    bwrap, rlimits = (run_suite(kube_node, ns, f"hostile-{m}") for m in ("bwrap", "rlimits"))

    for report, seccomp in ((bwrap, "filter"), (rlimits, "filter")):
        pod = report["pod"]
        assert (pod["uid"], pod["root_writable"], pod["seccomp"], pod["no_new_privs"],
                pod["cap_eff"], pod["token_mounted"], pod["env_secrets"]) == \
            (65532, False, seccomp, True, "0000000000000000", False, []), pod
        # The step's own process is outside any sandbox: only the NetworkPolicy stops it.
        assert all(not r.startswith("connected") for r in report["step"].values()), report["step"]
        assert set(report["cases"]) >= {"network_service", "network_api", "read_step_env",
                                        "kill_parent"}
    assert bwrap["isolation"]["mode"] == "bwrap", bwrap["isolation"]
    assert rlimits["isolation"]["mode"] == rlimits["isolation"]["requested"] == "rlimits"

    # bwrap: nothing gets out, including both cluster network cases.
    assert {c for c, r in bwrap["cases"].items() if escaped(c, r)} == set(), bwrap["cases"]
    for case in ("network_service", "network_api"):
        assert bwrap["cases"][case]["hostile_outcome"] == "failed", bwrap["cases"][case]
    # rlimits: what the container run measured gets out; the cluster's Services stay unreachable.
    out = {c for c, r in rlimits["cases"].items() if escaped(c, r)}
    assert out == RLIMITS_ESCAPES, rlimits["cases"]
    for case in ("network_service", "network_api"):
        assert rlimits["cases"][case]["hostile_outcome"] == "failed", rlimits["cases"][case]
    assert KUBERNETES_SERVICE_IP in rlimits["cases"]["network_api"]["target"]
