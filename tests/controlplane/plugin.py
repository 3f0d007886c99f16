"""pytest plugin: a real Kubernetes control plane for cluster tests (registered in tests/conftest.py).

Fixtures
  kube            session: a `cluster.Kube` (etcd + kube-apiserver + kube-controller-manager built by
                  tests/controlplane/build.sh, our CRD and a PyTorchJob CRD installed), or the cluster
                  in CWM_TEST_KUBECONFIG. Tear-down stops every process even when tests fail.
  kube_namespace  function: a fresh namespace name in that cluster, deleted after the test.
  kube_node       session: a second cluster whose pods really run (the control plane plus a node:
                  containerd, kubelet, kube-proxy, kube-scheduler, CoreDNS; see node.py), or the
                  cluster in CWM_TEST_KUBECONFIG. Its tests carry the `node` marker.
  node_namespace  function: a fresh namespace in the node cluster, its default ServiceAccount ready.
  node_project_images  session: the project's images loaded into the node (fails: `make images`).

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
from tests.controlplane.node import NodeError, project_image_refs

_STASH_KUBE = pytest.StashKey[Kube]()
_STASH_KUBE_NODE = pytest.StashKey[Kube]()
_STASH_SUMMARY = pytest.StashKey[dict[str, str]]()


def _session_cluster(request: pytest.FixtureRequest, with_node: bool,
                     key: pytest.StashKey[Kube]) -> Iterator[Kube]:
    """Start (or reach, with CWM_TEST_KUBECONFIG) a cluster for the session; always stop it."""
    if os.environ.get("CWM_SKIP_CLUSTER") == "1":
        pytest.skip("CWM_SKIP_CLUSTER=1: cluster tests skipped on purpose")
    started = time.monotonic()
    cm = connect(with_node=with_node)
    try:
        k = cm.__enter__()
    except ControlPlaneError as e:
        error = str(e)  # fail outside the except block: no chained traceback, just the message
    else:
        error = ""
    if error:
        pytest.fail(error, pytrace=False)
    request.config.stash[key] = k
    label = "cluster with a node" if with_node else "control plane"
    if k.local is not None:
        phases = {**k.local.timings, **{f"node {n}": t for n, t in (k.node.timings if k.node else {}).items()}}
        summary = ", ".join(f"{name} {secs:.1f} s" for name, secs in phases.items())
        line = f"started in {time.monotonic() - started:.1f} s ({summary}) at {k.local.server}"
        line += "".join(f"; note: {n}" for n in (k.node.notes if k.node else []))
    else:
        line = f"external cluster from CWM_TEST_KUBECONFIG={k.kubeconfig}"
    request.config.stash.setdefault(_STASH_SUMMARY, {})[label] = line
    try:
        yield k
    finally:
        del request.config.stash[key]
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[Kube]:
    """A real API server for the whole session (started once, ~5-15 s warm); no node."""
    yield from _session_cluster(request, with_node=False, key=_STASH_KUBE)


@pytest.fixture(scope="session")
def kube_node(request: pytest.FixtureRequest) -> Iterator[Kube]:
    """A cluster whose pods run: the control plane plus a node (node.py: containerd, kubelet,
    kube-proxy, kube-scheduler, CoreDNS), the controller manager running its default controllers.
    A separate cluster from `kube`'s (that one's tests write Job status themselves)."""
    yield from _session_cluster(request, with_node=True, key=_STASH_KUBE_NODE)


@pytest.fixture(scope="session")
def node_project_images(kube_node: Kube) -> list[str]:
    """The project's images (cwm-operator, cwm-beam, cwm-trainer as the chart names them), loaded
    into the node's containerd from the local Docker engine on first use (GBs: only tests that
    run them ask). FAILS naming `make images` when one is missing; on an external cluster the
    references are returned as they are (its registry or preloading is its own business)."""
    if kube_node.node is None:
        return project_image_refs()
    try:
        return kube_node.node.load_project_images(required=True)
    except NodeError as e:
        pytest.fail(str(e), pytrace=False)


def _namespace(k: Kube, labels: dict[str, str] | None = None) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(k.api_client)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"cwm.dev/test": "true", **(labels or {})}}})
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except Exception:  # noqa: BLE001 - best effort: the session cluster goes away anyway
            pass


@pytest.fixture
def kube_namespace(kube: Kube) -> Iterator[str]:
    """A new namespace for one test; deleted afterwards (the namespace controller empties it)."""
    yield from _namespace(kube)


@pytest.fixture
def node_namespace(kube_node: Kube) -> Iterator[str]:
    """A new namespace in the node-backed cluster, once its `default` ServiceAccount exists (the
    ServiceAccount admission plugin refuses pods until then)."""
    from kubernetes import client

    for name in _namespace(kube_node):
        core = client.CoreV1Api(kube_node.api_client)
        kube_node.wait_for(lambda core=core, name=name: core.read_namespaced_service_account(
                               "default", name), 30,
                           f"ServiceAccount {name}/default")
        yield name


_CLUSTER_FIXTURES = {"kube": _STASH_KUBE, "kube_node": _STASH_KUBE_NODE}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses a cluster carries `cluster`, and one that needs a node carries `node`,
    so `-m "not cluster"` never starts one and `-m "not node"` never starts a node."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if any(n in names for n in _CLUSTER_FIXTURES) and item.get_closest_marker("cluster") is None:
            item.add_marker(pytest.mark.cluster)
        if "kube_node" in names and item.get_closest_marker("node") is None:
            item.add_marker(pytest.mark.node)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Attach the cluster components' log tails to failing tests that used a cluster."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for fixture, key in _CLUSTER_FIXTURES.items():
        if fixture in getattr(item, "fixturenames", ()):
            k = item.config.stash.get(key, None)
            if k is not None:
                report.sections.append((f"{fixture} cluster logs", k.logs(30)))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    """One line per cluster the tests ran against, with its start-up time."""
    for label, line in config.stash.get(_STASH_SUMMARY, {}).items():
        terminalreporter.write_line(f"{label}: {line}")
