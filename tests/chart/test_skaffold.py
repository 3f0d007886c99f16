"""skaffold.yaml, checked statically (no skaffold binary or Docker engine here): it builds exactly
the three Dockerfiles, deploys this chart, and the values it hands helm, with its template
variables filled in the way skaffold fills them, render objects that validate strictly and run
the images just built."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.helm import CHART, REPO, Helm, container_env, one
from tests.chart.test_images import DOCKERFILES

SKAFFOLD = yaml.safe_load((REPO / "skaffold.yaml").read_text())
TEMPLATE = re.compile(r"\{\{\s*\.(IMAGE_(?:REPO|TAG|DIGEST)_([A-Za-z0-9_]+))\s*\}\}")
PROFILES = {p["name"]: p for p in SKAFFOLD["profiles"]}


def artifacts(section: dict[str, Any]) -> dict[str, str]:
    return {a["image"]: a["docker"]["dockerfile"] for a in section["build"]["artifacts"]}


def skaffold_key(image: str) -> str:
    """How skaffold names an artifact in template variables."""
    return re.sub(r"[^A-Za-z0-9]", "_", image)


def fill(template: str, built: dict[str, dict[str, str]]) -> str:
    def one_var(m: re.Match[str]) -> str:
        kind = m.group(1).split("_")[1]  # REPO, TAG, DIGEST
        return built[m.group(2)][kind]
    return TEMPLATE.sub(one_var, template)


def built_images(section: dict[str, Any], repo_prefix: str) -> dict[str, dict[str, str]]:
    return {
        skaffold_key(image): {
            "REPO": f"{repo_prefix}{image}",
            "TAG": "3f2a9c1",
            "DIGEST": "sha256:" + f"{i:x}" * 64,
        }
        for i, image in enumerate(artifacts(section), start=10)
    }


def test_api_version_and_sections() -> None:
    assert SKAFFOLD["apiVersion"].startswith("skaffold/v4")
    assert SKAFFOLD["kind"] == "Config"
    assert set(PROFILES) >= {"local", "gpu"}


@pytest.mark.parametrize("where", ["top", "local", "gpu"])
def test_builds_exactly_the_three_dockerfiles(where: str) -> None:
    section = SKAFFOLD if where == "top" else PROFILES[where]
    built = artifacts(section)
    expected = {str(p.relative_to(REPO)) for p in DOCKERFILES.values()}
    assert set(built.values()) == expected
    for artifact in section["build"]["artifacts"]:
        assert artifact.get("context", ".") == "."  # the .dockerignore'd repository root


def test_local_profile_activates_on_kind_and_k3d() -> None:
    contexts = [a["kubeContext"] for a in PROFILES["local"]["activation"]]
    assert any(re.fullmatch(c, "kind-cwm") for c in contexts)
    assert any(re.fullmatch(c, "k3d-cwm") for c in contexts)
    assert not any(re.fullmatch(c, "gke_acme_europe-west4_gpu") for c in contexts)
    assert PROFILES["local"]["build"]["local"]["push"] is False
    assert PROFILES["gpu"]["build"]["local"]["push"] is True


def release(section: dict[str, Any]) -> dict[str, Any]:
    (rel,) = section["deploy"]["helm"]["releases"]
    return rel


@pytest.mark.parametrize(("profile", "repo_prefix"), [
    ("local", ""), ("gpu", "ghcr.io/acme/"),
])
def test_deploys_the_chart_with_the_built_images(helm: Helm, profile: str, repo_prefix: str,
                                                 tmp_path: Path) -> None:
    section = PROFILES[profile]
    rel = release(section)
    assert (REPO / rel["chartPath"]).resolve() == CHART
    built = built_images(section, repo_prefix)
    used = {m.group(2) for v in rel["setValueTemplates"].values() for m in TEMPLATE.finditer(str(v))}
    assert used == set(built), "every built artifact reaches the chart, and only those"
    args = ["template", rel["name"], str(CHART), "--namespace", rel["namespace"], "--include-crds"]
    for f in rel.get("valuesFiles", []):
        assert (REPO / f).is_file(), f
        args += ["--values", str(REPO / f)]
    for key, value in rel["setValueTemplates"].items():
        args += ["--set", f"{key}={fill(str(value), built)}"]
    assert "setValues" not in rel, "use overrides: --set turns strings like 'true' into booleans"
    if "overrides" in rel:
        overrides = tmp_path / "overrides.yaml"
        overrides.write_text(yaml.safe_dump(rel["overrides"]))
        args += ["--values", str(overrides)]
    objects = [d for d in yaml.safe_load_all(helm.run(*args).stdout) if d]
    for obj in objects:
        kubernetes_validate.validate(obj, "1.36.0", strict=True)
    deployment = one(objects, "Deployment")
    env = container_env(deployment)
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    for name, var in (("cwm-operator", image), ("cwm-beam", env["CWM_BEAM_IMAGE"]),
                      ("cwm-trainer", env["CWM_TRAINER_IMAGE"])):
        b = built[skaffold_key(name)]
        if profile == "gpu":
            assert var == f"{b['REPO']}@{b['DIGEST']}"
        else:
            assert var == f"{b['REPO']}:{b['TAG']}"
    if profile == "gpu":
        from cwm_operator.settings import Settings

        settings = Settings.from_env({k: v for k, v in env.items() if isinstance(v, str)})
        assert dict(settings.gpu_node_selector) == {"nvidia.com/gpu.present": "true"}
