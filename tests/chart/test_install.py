"""The chart installed into a real API server (tests/controlplane), and the operator run with the
chart's ServiceAccount and RBAC instead of as an admin.

- `helm install` creates every object (the API server validates them; RBAC objects are checked
  for privilege escalation by the server itself, since helm runs as admin but grants less).
- The operator authenticates with a token of the chart's ServiceAccount (TokenRequest: what the
  kubelet mounts into the pod) and nothing else.
- The operator's own scenario tests (tests/operator/test_scenarios.py) are collected here a
  second time, with their `env` and `operator` fixtures replaced: the chart installed with
  `watch.namespaces` (a Role), the ServiceAccount's token, settings parsed from the rendered
  Deployment's environment. Any call the chart does not allow fails a scenario.
- The cluster-wide mode (a ClusterRole) runs the real entry point, `python -m cwm_operator` with
  the Deployment's own arguments, as a process: liveness, metrics and a first child.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.apiproxy import RecordingProxy
from tests.chart.helm import CHART, REPO, container_env

pytestmark = pytest.mark.cluster

SCENARIO_VALUES = Path(__file__).with_name("scenario-values.yaml")


# ----- helpers ---------------------------------------------------------------------------------

def helm_install(kube: Any, release: str, namespace: str, *extra: str) -> list[dict[str, Any]]:
    """`helm install` as the cluster admin; returns the objects of the release's manifest."""
    done = kube.helm("install", release, str(CHART), "--namespace", namespace, *extra, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "kubectl apply -f examples/cluster.yaml" in done.stdout, "NOTES.txt missing"
    manifest = kube.helm("get", "manifest", release, "--namespace", namespace, check=True).stdout
    return [d for d in yaml.safe_load_all(manifest) if d]


def helm_uninstall(kube: Any, release: str, namespace: str) -> None:
    kube.helm("uninstall", release, "--namespace", namespace)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def token_kubeconfig(kube: Any, namespace: str, service_account: str, path: Path,
                     server: str | None = None) -> Path:
    """A kubeconfig holding a fresh token of the ServiceAccount (TokenRequest API), the way a
    pod's projected token works: the operator is that ServiceAccount and nothing more. With
    `server`, it talks to that URL (the recording proxy) instead of the API server."""
    from kubernetes import client

    core = client.CoreV1Api(kube.api_client)
    token = core.create_namespaced_service_account_token(
        service_account, namespace, {"spec": {"expirationSeconds": 3600}}).status.token
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    if server is not None:
        cluster = {"name": cluster["name"], "cluster": {"server": server}}
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"],
                                                      "user": service_account,
                                                      "namespace": namespace}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def whoami(kubeconfig: Path) -> str:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        review = client.AuthenticationV1Api(api).create_self_subject_review({})
        return review.status.user_info.username
    finally:
        api.close()


def wait_allowed(kube: Any, kubeconfig: Path, namespace: str) -> None:
    """RBAC grants reach the authorizer's cache after a moment: wait until pipelines list."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kubeconfig))
    custom = client.CustomObjectsApi(api)
    try:
        kube.wait_for(lambda: custom.list_namespaced_custom_object(
            "cwm.dev", "v1alpha1", namespace, "cwmpipelines") is not None,
            timeout=20, what="the chart's RBAC to take effect")
    finally:
        api.close()


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    deployment = of_kind(objects, "Deployment")[0]
    return {k: v for k, v in container_env(deployment).items() if isinstance(v, str)}


# ----- the operator's scenarios with the chart's identity --------------------------------------

from tests.operator import test_scenarios as _scenarios  # noqa: E402
from tests.operator.conftest import Env  # noqa: E402
from tests.operator.helpers import SETTINGS, Cluster  # noqa: E402


@pytest.fixture(scope="session")
def api_proxy(kube: Any) -> Iterator[RecordingProxy]:
    """One recording proxy for the session: the scenarios' operator talks through it."""
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"]
    ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
    proxy = RecordingProxy(cluster["server"].rstrip("/"), ca).start()
    try:
        yield proxy
    finally:
        proxy.stop()


# A load test makes the happy path's calls fifty times over (~50 s): not rerun here.
NOT_RERUN = {"test_fifty_pipelines_at_once_all_complete"}
SCENARIOS = sorted(n for n in dir(_scenarios) if n.startswith("test_") and n not in NOT_RERUN)
COMPLETED: set[str] = set()


@pytest.fixture
def chart_release(kube: Any, kube_namespace: str, tmp_path: Path,
                  api_proxy: RecordingProxy) -> Iterator[dict[str, Any]]:
    """The chart installed in the test namespace, watching only it (Role + RoleBinding); the
    operator's kubeconfig holds the ServiceAccount's token and goes through the proxy."""
    release = "cwm"
    objects = helm_install(kube, release, kube_namespace, "--values", str(SCENARIO_VALUES),
                           "--set", f"watch.namespaces={{{kube_namespace}}}")
    (sa,) = of_kind(objects, "ServiceAccount")
    name = sa["metadata"]["name"]
    direct = token_kubeconfig(kube, kube_namespace, name, tmp_path / "direct.kubeconfig")
    proxied = token_kubeconfig(kube, kube_namespace, name, tmp_path / "operator.kubeconfig",
                               server=api_proxy.url)
    wait_allowed(kube, direct, kube_namespace)
    try:
        yield {"objects": objects, "kubeconfig": proxied, "direct": direct,
               "service_account": sa}
    finally:
        helm_uninstall(kube, release, kube_namespace)


@pytest.fixture
def env(kube: Any, kube_namespace: str, tmp_path: Path, chart_release: dict[str, Any],
        request: pytest.FixtureRequest, api_proxy: RecordingProxy) -> Iterator[Env]:
    storage = tmp_path / "storage"
    storage.mkdir()
    yield Env(Cluster(kube, kube_namespace), kube_namespace, chart_release["kubeconfig"], storage)
    COMPLETED.add(request.node.name.removesuffix(SUFFIX))


@pytest.fixture
def operator(env: Env, chart_release: dict[str, Any]) -> Iterator[Any]:
    """The operator as the chart's ServiceAccount, with the chart's settings (timings from the
    scenarios' fast profile, as their own fixture uses)."""
    from cwm_operator.main import OperatorThread, load_configuration
    from cwm_operator.settings import Settings

    settings = Settings.from_env(operator_env(chart_release["objects"])).fast(stuck_seconds=60)
    configuration = load_configuration(str(env.kubeconfig))
    with OperatorThread(settings, configuration, [env.namespace]) as op:
        yield op


# Every scenario of the operator, collected again here with the fixtures above.
SUFFIX = "__as_chart_serviceaccount"
for _name in SCENARIOS:
    globals()[f"{_name}{SUFFIX}"] = getattr(_scenarios, _name)


def test_zz_every_granted_permission_is_used_by_the_scenarios(
        api_proxy: RecordingProxy) -> None:
    """Least privilege, the other way round: across the scenarios above (run first, in file
    order), the operator used every granted (group, resource, verb), and was never refused."""
    from cwm_operator.permissions import RULES
    from tests.chart.test_rbac import triples

    missing_runs = sorted(set(SCENARIOS) - COMPLETED)
    if missing_runs:
        pytest.skip(f"needs every scenario in this session (not run: {missing_runs})")
    refused = {t: s for t, s in api_proxy.statuses.items() if 403 in s}
    assert not refused, f"the operator was refused: {refused}"
    granted = triples(RULES)
    assert api_proxy.used <= granted  # also implied by no 403s
    # Checked by an admission plugin (OwnerReferencesPermissionEnforcement) when a child with
    # blockOwnerDeletion is created, never requested: not observable as a request.
    admission_only = {("cwm.dev", "cwmpipelines/finalizers", "update")}
    assert granted - api_proxy.used == admission_only, \
        f"granted but never used: {sorted(granted - api_proxy.used - admission_only)}"


def test_scenario_values_reproduce_the_scenarios_settings(helm: Any) -> None:
    """The chart can express the scenarios' settings exactly (images, GPU defaults)."""
    from cwm_operator.settings import Settings

    objects = helm.render(SCENARIO_VALUES)
    assert Settings.from_env(operator_env(objects)) == SETTINGS


def test_the_operator_authenticates_as_the_chart_serviceaccount(
        chart_release: dict[str, Any], kube_namespace: str) -> None:
    name = chart_release["service_account"]["metadata"]["name"]
    user = f"system:serviceaccount:{kube_namespace}:{name}"
    assert whoami(chart_release["direct"]) == user
    assert whoami(chart_release["kubeconfig"]) == user  # through the proxy: same identity


def test_listed_namespace_mode_grants_nothing_elsewhere(
        kube: Any, chart_release: dict[str, Any], kube_namespace: str) -> None:
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    api = config.new_client_from_config(config_file=str(chart_release["direct"]))
    try:
        custom = client.CustomObjectsApi(api)
        with pytest.raises(ApiException) as err:
            custom.list_cluster_custom_object("cwm.dev", "v1alpha1", "cwmpipelines")
        assert err.value.status == 403
        with pytest.raises(ApiException) as err:
            client.BatchV1Api(api).list_namespaced_job("default")
        assert err.value.status == 403
        with pytest.raises(ApiException) as err:  # no delete: the garbage collector does it
            client.BatchV1Api(api).delete_namespaced_job("anything", kube_namespace)
        assert err.value.status == 403
        with pytest.raises(ApiException) as err:
            client.CoreV1Api(api).list_namespaced_secret(kube_namespace)
        assert err.value.status == 403
    finally:
        api.close()


# ----- cluster-wide mode: the real entry point as a process ------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except OSError:
        return 0, ""


def test_cluster_wide_install_runs_the_deployments_command(
        kube: Any, kube_namespace: str, tmp_path: Path) -> None:
    """Install watching every namespace (ClusterRole), then run exactly the Deployment's
    command (ENTRYPOINT of operator/Dockerfile + the rendered args and env) with the
    ServiceAccount's token; it reconciles a pipeline in another namespace."""
    from kubernetes import client

    from tests.chart.dockerfile import parse
    from tests.operator.helpers import short_manifest

    release = f"cwm-{kube_namespace}"  # ClusterRoles are cluster-scoped: one name per test
    objects = helm_install(kube, release, kube_namespace)
    assert of_kind(objects, "ClusterRole") and not of_kind(objects, "Role")
    (sa,) = of_kind(objects, "ServiceAccount")
    pipelines_ns = f"{kube_namespace}-p"
    core = client.CoreV1Api(kube.api_client)
    core.create_namespace({"metadata": {"name": pipelines_ns}})
    kubeconfig = token_kubeconfig(kube, kube_namespace, sa["metadata"]["name"],
                                  tmp_path / "operator.kubeconfig")
    wait_allowed(kube, kubeconfig, pipelines_ns)

    container = of_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    entrypoint = parse(REPO / "operator" / "Dockerfile").final.last("ENTRYPOINT").exec_form()
    assert entrypoint[0] == "python"
    live, metrics = free_port(), free_port()
    args = [a.replace(":8080/", f":{live}/").replace("0.0.0.0", "127.0.0.1")
            .replace("--metrics-port=9090", f"--metrics-port={metrics}") for a in container["args"]]
    assert "--all-namespaces" in args
    env = {**os.environ, **operator_env(objects), "KUBECONFIG": str(kubeconfig)}
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, *entrypoint[1:], *args, f"--kubeconfig={kubeconfig}"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    try:
        kube.wait_for(lambda: http_get(f"http://127.0.0.1:{live}/healthz")[0] == 200,
                      timeout=30, what="the operator's liveness endpoint")
        storage = tmp_path / "storage"
        storage.mkdir()
        cluster = Cluster(kube, pipelines_ns)
        cluster.create(short_manifest("wide", f"file://{storage}"))
        child = cluster.wait_child("wide-tokenizer-1", timeout=30)
        assert child["kind"] == "Job"
        image = child["spec"]["template"]["spec"]["containers"][0]["image"]
        app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
        assert image == f"ghcr.io/cwm-pipeline/cwm-beam:{app_version}"
        cluster.wait_status("wide", lambda s: s.get("currentStep") == "tokenizer", "running")
        status, text = http_get(f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200 and "cwm" in text
        assert proc.poll() is None, log.read_text()[-3000:]
        # Never refused by RBAC. (Other tests' pipelines in namespaces being deleted are
        # watched too here, and the API server forbids creating their events: not RBAC.)
        refusals = re.findall(r'forbidden: User \\?"system:serviceaccount:[^"\\]+', log.read_text())
        assert not refusals, log.read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        helm_uninstall(kube, release, kube_namespace)
        core.delete_namespace(pipelines_ns)
