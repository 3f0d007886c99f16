"""Fixtures of the operator scenarios: a namespace with the operator's ServiceAccount, and the
operator itself running in a thread as that ServiceAccount."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.operator.helpers import SETTINGS, Cluster, configuration_for, operator_identity


@dataclass
class Env:
    cluster: Cluster
    namespace: str
    kubeconfig: Path  # the operator's ServiceAccount
    storage_dir: Path

    @property
    def storage(self) -> str:
        return f"file://{self.storage_dir}"


@pytest.fixture
def env(kube: Any, kube_namespace: str, tmp_path: Path) -> Env:
    storage = tmp_path / "storage"
    storage.mkdir()
    return Env(Cluster(kube, kube_namespace), kube_namespace,
               operator_identity(kube, kube_namespace), storage)


@pytest.fixture
def operator(env: Env) -> Iterator[Any]:
    """The operator (fast profile) watching the test's namespace, as its ServiceAccount."""
    from cwm_operator.main import OperatorThread

    settings = SETTINGS.fast(stuck_seconds=60)
    with OperatorThread(settings, configuration_for(env.kubeconfig), [env.namespace]) as op:
        yield op
