"""The Helm chart, checked statically with the real helm binary and Kubernetes' OpenAPI schemas.

No cluster is needed here: `helm lint --strict`, `helm template` with the default values and with
every ci/*-values.yaml, strict kubernetes-validate of every rendered object (the CRD as
apiextensions.k8s.io/v1), the values' documentation and schema, and the Deployment's invariants.
The install into a real API server is in test_install.py.
"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.helm import (
    CHART,
    NAMESPACE,
    RELEASE,
    REPO,
    Helm,
    container_env,
    find,
    one,
    values_files,
)

# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the test control plane's.
KUBE_VERSIONS = ("1.27.0", "1.36.0")
VALUES_CASES = ["default"] + [p.name for p in values_files()]
CHART_YAML = yaml.safe_load((CHART / "Chart.yaml").read_text())
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# ----- Chart.yaml and the CRD ------------------------------------------------------------------

def test_chart_versions_follow_the_project() -> None:
    from cwm_operator import __version__

    assert CHART_YAML["appVersion"] == project_version() == __version__
    assert CHART_YAML["version"] == project_version()
    assert CHART_YAML["apiVersion"] == "v2"


def test_chart_crd_is_the_generated_one() -> None:
    """crds/ holds exactly what `cwm crd` prints (regenerate with `make crd`)."""
    from cwm_spec.crd import crd_yaml

    shipped = (CHART / "crds" / "cwmpipelines.cwm.dev.yaml").read_text()
    assert shipped == crd_yaml(), "charts/cwm-operator/crds is stale: run `make crd`"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["cwmpipelines.cwm.dev.yaml"]


# ----- lint and render -------------------------------------------------------------------------

@pytest.mark.parametrize("case", VALUES_CASES)
def test_helm_lint_strict(helm: Helm, case: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    if case != "default":
        args += ["--values", str(CHART / "ci" / case)]
    done = helm.run(*args, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def test_at_least_three_extra_values_files() -> None:
    assert len(values_files()) >= 3


def _validate(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        raise AssertionError(
            f"{obj['kind']} {obj['metadata']['name']}: {e.message} at {where or '(root)'}"
        ) from None


# ServiceMonitor is a Prometheus Operator kind, not in Kubernetes' schemas: checked below against
# the fields of monitoring.coreos.com/v1 that the chart uses.
NOT_BUILT_IN = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", VALUES_CASES)
def test_rendered_objects_validate_strictly(rendered: dict[str, list[dict[str, Any]]],
                                            case: str, version: str) -> None:
    objects = rendered[case]
    assert objects, f"{case}: nothing rendered"
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in NOT_BUILT_IN:
            continue
        _validate(obj, version)


def test_crd_validates_as_apiextensions_v1(rendered: dict[str, list[dict[str, Any]]]) -> None:
    crd = one(rendered["default"], "CustomResourceDefinition", "cwmpipelines.cwm.dev")
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    for version in KUBE_VERSIONS:
        _validate(crd, version)


SERVICE_MONITOR_ENDPOINT_KEYS = {"port", "path", "interval", "scrapeTimeout"}


def test_service_monitor_shape(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Only rendered when asked for; selects the metrics Service by its labels and port name."""
    assert not find(rendered["default"], "ServiceMonitor")
    objects = rendered["gpu-values.yaml"]
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert set(spec) == {"namespaceSelector", "selector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    labels = service["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = spec["endpoints"]
    assert set(endpoint) == SERVICE_MONITOR_ENDPOINT_KEYS
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")


def test_every_object_carries_the_standard_labels(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for case, objects in rendered.items():
        for obj in objects:
            if obj["kind"] == "CustomResourceDefinition":
                continue  # crds/ is installed as is, never templated
            labels = obj["metadata"].get("labels", {})
            for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                        "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                        "helm.sh/chart"):
                assert key in labels, f"{case}: {obj['kind']} {obj['metadata']['name']} lacks {key}"


# ----- values.yaml: documented, typed ----------------------------------------------------------

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][A-Za-z0-9]*):(?P<rest>.*)$")


def undocumented_values(text: str) -> list[str]:
    """Leaf values with no `# --` comment in the comment block right above them. Sections (maps
    of further keys) need none; a documented map's own keys are its content and need none."""
    lines = text.splitlines()
    missing: list[str] = []
    path: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    for i, line in enumerate(lines):
        m = _KEY.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        path = [p for p in path if p[0] < indent]
        block: list[str] = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j].strip())
            j -= 1
        documented = any(c.startswith("# --") for c in block)
        path.append((indent, m["key"], documented))
        nxt = next((ln for ln in lines[i + 1:] if ln.strip() and not ln.strip().startswith("#")), "")
        nxt_key = _KEY.match(nxt)
        is_section = not m["rest"].strip() and nxt_key and len(nxt_key["indent"]) > indent
        if not is_section and not any(doc for _, _, doc in path):
            missing.append(".".join(k for _, k, _ in path))
    return missing


def test_every_value_is_documented() -> None:
    assert undocumented_values(VALUES_TEXT) == []


def test_undocumented_value_is_found() -> None:
    text = "a:\n  # -- fine\n  b: 1\n  c: 2\nd: []\n# -- a documented map\ne:\n  f: 1\n"
    assert undocumented_values(text) == ["a.c", "d"]


def leaf_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in leaf_paths(v, f"{prefix}.{k}".lstrip("."))]
    return [prefix]


def schema_at(path: str) -> dict[str, Any] | None:
    node: Any = SCHEMA
    for part in path.split("."):
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif node.get("additionalProperties") not in (None, False):
            return node  # a free-form map (labels, resources...): its keys are user data
        elif node.get("type") == "object" and "properties" not in node:
            return node
        else:
            return None
    return node


def test_schema_covers_every_default_value() -> None:
    missing = [p for p in leaf_paths(VALUES) if schema_at(p) is None]
    assert missing == []


def test_schema_is_closed() -> None:
    """Typos in values files are errors, not silently ignored keys."""
    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '(root)'} is open"
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}")
    walk(SCHEMA, "")


@pytest.mark.parametrize(("setting", "field"), [
    ("images.tag=latest", "/images/tag"),
    ("images.beam.tag=latest", "/images/beam/tag"),
    ("watch.namespaces[0]=Not_A_Namespace", "/watch/namespaces/0"),
    ("children.cleanPodPolicy=Sometimes", "/children/cleanPodPolicy"),
    ("operator.logLevel=loud", "/operator/logLevel"),
    ("operator.logLevel=info", "/operator/logLevel"),
    ("metrics.port=70000", "/metrics/port"),
    ("operator.replicas=2", "/operator"),
    ("children.gpu.tolerations[0].operator=Maybe", "/children/gpu/tolerations/0/operator"),
])
def test_bad_values_are_rejected_naming_the_field(helm: Helm, setting: str, field: str) -> None:
    done = helm.template(set_values=(setting,), check=False)
    assert done.returncode != 0, f"--set {setting} was accepted"
    assert field in done.stderr, done.stderr


def test_service_account_name_required_when_not_created(helm: Helm) -> None:
    done = helm.template(set_values=("serviceAccount.create=false",), check=False)
    assert done.returncode != 0
    assert "serviceAccount.name is required" in done.stderr


# ----- the operator Deployment -----------------------------------------------------------------

def deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")


@pytest.mark.parametrize("case", VALUES_CASES)
def test_deployment_is_one_locked_down_replica(rendered: dict[str, list[dict[str, Any]]],
                                               case: str) -> None:
    d = deployment(rendered[case])
    spec = d["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["port"] in ports
    assert f"--liveness=http://0.0.0.0:{ports[probe['port']]}{probe['path']}" in container["args"]
    # The only writable path is the emptyDir at /tmp, where HOME points.
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    assert container_env(d)["HOME"] == "/tmp"
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()


def test_default_images_are_the_app_version(rendered: dict[str, list[dict[str, Any]]]) -> None:
    d = deployment(rendered["default"])
    version = CHART_YAML["appVersion"]
    env = container_env(d)
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == \
        f"ghcr.io/cwm-pipeline/cwm-operator:{version}"
    assert env["CWM_BEAM_IMAGE"] == f"ghcr.io/cwm-pipeline/cwm-beam:{version}"
    assert env["CWM_TRAINER_IMAGE"] == f"ghcr.io/cwm-pipeline/cwm-trainer:{version}"


def test_digests_win_over_tags(rendered: dict[str, list[dict[str, Any]]]) -> None:
    d = deployment(rendered["namespaced-values.yaml"])
    env = container_env(d)
    image = d["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/ml/cwm-operator@sha256:" + "0" * 63 + "1"
    assert env["CWM_BEAM_IMAGE"] == "registry.example.com/ml/cwm-beam@sha256:" + "0" * 63 + "2"
    assert env["CWM_TRAINER_IMAGE"] == "registry.example.com/ml/cwm-trainer:0.1.0-cu128"


def test_local_images_have_no_registry(rendered: dict[str, list[dict[str, Any]]]) -> None:
    env = container_env(deployment(rendered["local-values.yaml"]))
    assert env["CWM_BEAM_IMAGE"] == f"cwm-beam:{CHART_YAML['appVersion']}"


class RecordingEnv(dict):
    """An environment that records which variables are read."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def operator_settings(objects: list[dict[str, Any]]) -> tuple[Any, set[str]]:
    """The operator's own Settings parsed from the rendered environment, and the variables it
    read."""
    from cwm_operator.settings import Settings

    env = RecordingEnv({k: v for k, v in container_env(deployment(objects)).items()
                        if isinstance(v, str)})
    return Settings.from_env(env), env.read


@pytest.mark.parametrize("case", VALUES_CASES)
def test_chart_sets_exactly_the_settings_the_operator_reads(
        rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    settings, read = operator_settings(rendered[case])
    set_by_chart = {k for k in container_env(deployment(rendered[case])) if k.startswith("CWM_")}
    assert set_by_chart == {k for k in read if k.startswith("CWM_")}
    assert settings.beam_image and settings.trainer_image


def test_children_defaults_reach_the_operator(rendered: dict[str, list[dict[str, Any]]]) -> None:
    values = yaml.safe_load((CHART / "ci" / "gpu-values.yaml").read_text())
    children = values["children"]
    settings, _ = operator_settings(rendered["gpu-values.yaml"])
    assert dict(settings.gpu_node_selector) == children["gpu"]["nodeSelector"]
    assert list(settings.gpu_tolerations) == children["gpu"]["tolerations"]
    assert settings.image_pull_policy == "Always"
    assert settings.service_account == "cwm-steps"
    assert settings.clean_pod_policy == "Running"
    assert settings.stuck_seconds == 3600
    assert (settings.retry_backoff_seconds, settings.retry_backoff_max_seconds) == (60, 600)
    assert settings.beam_image == "europe-docker.pkg.dev/acme-ml/cwm/cwm-beam:0.1.0"
    assert settings.trainer_image == "europe-docker.pkg.dev/acme-ml/cwm/cwm-trainer:0.1.0"


def test_default_children_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The chart's defaults are the operator's own defaults, plus the images and GPU taint."""
    from cwm_operator.settings import Settings

    settings, _ = operator_settings(rendered["default"])
    plain = Settings()
    for name in ("image_pull_policy", "stuck_seconds", "retry_backoff_seconds",
                 "retry_backoff_max_seconds", "service_account", "clean_pod_policy"):
        assert getattr(settings, name) == getattr(plain, name), name
    assert list(settings.gpu_tolerations) == \
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.mark.parametrize("case", VALUES_CASES)
def test_operator_accepts_the_rendered_arguments(rendered: dict[str, list[dict[str, Any]]],
                                                 case: str) -> None:
    """The operator's own argument parser reads the Deployment's args (exits on unknown flags)."""
    from cwm_operator.main import parse_args

    container = deployment(rendered[case])["spec"]["template"]["spec"]["containers"][0]
    args = parse_args(container["args"])
    assert args.all_namespaces != bool(args.namespace)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.liveness == f"http://0.0.0.0:{ports['liveness']}/healthz"
    assert args.metrics_port == ports.get("metrics")


def test_watch_modes_select_the_namespace_flags(rendered: dict[str, list[dict[str, Any]]]) -> None:
    args = deployment(rendered["default"])["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and not any(a.startswith("--namespace=") for a in args)
    args = deployment(rendered["namespaced-values.yaml"])["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace=")] == \
        ["--namespace=research", "--namespace=team-b"]


def test_metrics_can_be_turned_off(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["minimal-values.yaml"]
    assert not find(objects, "Service") and not find(objects, "ServiceMonitor")
    container = deployment(objects)["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--metrics-port") for a in container["args"])
    assert [p["name"] for p in container["ports"]] == ["liveness"]
    assert not find(objects, "ServiceAccount") and not find(objects, "ClusterRole")
    assert deployment(objects)["spec"]["template"]["spec"]["serviceAccountName"] == \
        "platform-cwm-operator"


def test_metrics_service_targets_the_metrics_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["default"]
    service = one(objects, "Service")
    container = deployment(objects)["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ports
    assert f"--metrics-port={ports[port['targetPort']]}" in container["args"]


def test_release_namespace_is_used(helm: Helm) -> None:
    objects = helm.render(namespace="ops")
    for obj in objects:
        if obj["kind"] in ("Deployment", "ServiceAccount", "Service"):
            assert obj["metadata"]["namespace"] == "ops"
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "ops"
    assert RELEASE in binding["metadata"]["name"]
