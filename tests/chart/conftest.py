"""Shared, session-scoped fixtures of the chart tests: helm and what it renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chart.helm import Helm, HelmMissing, values_files


@pytest.fixture(scope="session")
def helm() -> Helm:
    try:
        return Helm.create()
    except HelmMissing as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> dict[str, list[dict[str, Any]]]:
    """Objects rendered with the default values ("default") and with each ci/ values file
    (keyed by file name), each rendered once per session."""
    out = {"default": helm.render()}
    for path in values_files():
        out[path.name] = helm.render(path)
    return out


@pytest.fixture(scope="session")
def ci_values() -> list[Path]:
    return values_files()
