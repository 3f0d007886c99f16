"""pytest plugin: a real Kubernetes control plane for cluster tests (registered in tests/conftest.py).

Fixtures
  kube            session: a `cluster.Kube` (etcd + kube-apiserver + kube-controller-manager built by
                  tests/controlplane/build.sh, our CRD and a PyTorchJob CRD installed), or the cluster
                  in CWM_TEST_KUBECONFIG. Tear-down stops every process even when tests fail.
  kube_namespace  function: a fresh namespace name in that cluster, deleted after the test.

When the binaries are missing and no CWM_TEST_KUBECONFIG is set, `kube` FAILS with the command that
builds them (a skip would hide a missing install step); CWM_SKIP_CLUSTER=1 skips on purpose.
When a test using `kube` fails, the components' log tails are attached to its report.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.controlplane.cluster import ControlPlaneError, Kube, connect

_STASH_KUBE = pytest.StashKey[Kube]()
_STASH_SUMMARY = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[Kube]:
    """A real API server for the whole session (started once, ~5-15 s warm)."""
    if os.environ.get("CWM_SKIP_CLUSTER") == "1":
        pytest.skip("CWM_SKIP_CLUSTER=1: cluster tests skipped on purpose")
    started = time.monotonic()
    cm = connect()
    try:
        k = cm.__enter__()
    except ControlPlaneError as e:
        error = str(e)  # fail outside the except block: no chained traceback, just the message
    else:
        error = ""
    if error:
        pytest.fail(error, pytrace=False)
    request.config.stash[_STASH_KUBE] = k
    if k.local is not None:
        phases = ", ".join(f"{name} {secs:.1f} s" for name, secs in k.local.timings.items())
        summary = f"started in {time.monotonic() - started:.1f} s ({phases}) at {k.local.server}"
    else:
        summary = f"external cluster from CWM_TEST_KUBECONFIG={k.kubeconfig}"
    request.config.stash[_STASH_SUMMARY] = summary
    try:
        yield k
    finally:
        del request.config.stash[_STASH_KUBE]
        cm.__exit__(None, None, None)


@pytest.fixture
def kube_namespace(kube: Kube) -> Iterator[str]:
    """A new namespace for one test; deleted afterwards (the namespace controller empties it)."""
    from kubernetes import client

    core = client.CoreV1Api(kube.api_client)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"cwm.dev/test": "true"}}})
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except Exception:  # noqa: BLE001 - best effort: the session cluster goes away anyway
            pass


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses the cluster carries `cluster`, so `-m "not cluster"` never starts one."""
    for item in items:
        if "kube" in getattr(item, "fixturenames", ()) and item.get_closest_marker("cluster") is None:
            item.add_marker(pytest.mark.cluster)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Attach the control plane's log tails to failing tests that used the cluster."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "kube" in getattr(item, "fixturenames", ()):
        k = item.config.stash.get(_STASH_KUBE, None)
        if k is not None:
            report.sections.append(("control plane logs", k.logs(30)))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    """One line saying which cluster the cluster tests ran against and how long start-up took."""
    summary = config.stash.get(_STASH_SUMMARY, None)
    if summary:
        terminalreporter.write_line(f"control plane: {summary}")
