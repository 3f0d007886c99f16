"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) as processes.

What controller-runtime's envtest does for Go operators, for our Python tests: the binaries are
built from Go modules by `tests/controlplane/build.sh`; this module starts them on free loopback
ports with a generated PKI, waits until each is healthy, and stops them. By default no kubelet or
scheduler runs, so pods never start: `lifecycle.py` moves Jobs and PyTorchJobs through their states
the way their controllers would. With `with_node=True` a node runs beside it (node.py: pods really
run, the controllers write every status, and the lifecycle helpers refuse).

`connect()` is the entry point: it starts a local control plane, or, when `CWM_TEST_KUBECONFIG`
is set, uses that cluster (kind, k3d, a real one) so the same tests run anywhere.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.controlplane import lifecycle, node
from tests.controlplane.pki import CertificateAuthority, signing_key_pair
from tests.controlplane.procs import Component, ControlPlaneError, free_port, wait_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_SCRIPT = HERE / "build.sh"
CWM_CRD = REPO / "charts" / "cwm-operator" / "crds" / "cwmpipelines.cwm.dev.yaml"
PYTORCHJOB_CRD = HERE / "crds" / "pytorchjobs.kubeflow.org.yaml"

#: The controllers our tests rely on: cascade deletion of owned objects, namespace deletion, the
#: `default` ServiceAccount in new namespaces. The Job controller is left out on purpose: with no
#: kubelet its pods would never run, and it would race the status that `lifecycle` writes.
CONTROLLERS = ("garbage-collector-controller", "namespace-controller", "serviceaccount-controller")

#: What a node adds to the control plane's binaries (build.sh builds them into the same folder).
NODE_BINARIES = ("kubelet", "kube-scheduler", "kube-proxy")

ADMIN_USER = "cwm-test-admin"
T = TypeVar("T")


def read_versions() -> dict[str, str]:
    """The pinned versions from `versions.env` (the single place they are written)."""
    versions: dict[str, str] = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key.strip()] = value.strip()
    return versions


def cache_dir() -> Path:
    """The cache root build.sh and tools.sh use: `CWM_CACHE`, else `<repo>/.cache`."""
    return Path(os.environ.get("CWM_CACHE") or REPO / ".cache").resolve()


def bin_dir() -> Path:
    """Where build.sh puts the control-plane binaries (the same rule as the script)."""
    v = read_versions()
    return cache_dir() / "controlplane" / f"k8s-{v['K8S_VERSION']}-etcd-{v['ETCD_VERSION']}" / "bin"


@dataclass(frozen=True)
class Binaries:
    """Paths of the four programs a local control plane needs."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path

    @classmethod
    def find(cls) -> Binaries:
        """The built binaries, or an error that says how to build them."""
        folder = bin_dir()
        paths = {name: folder / name.replace("_", "-") for name in cls.__dataclass_fields__}
        missing = [p.name for p in paths.values() if not os.access(p, os.X_OK)]
        if missing:
            raise ControlPlaneError(
                f"control-plane binaries missing in {folder}: {', '.join(missing)}. Build them with "
                f"`{BUILD_SCRIPT.relative_to(REPO)}` (`make controlplane`; ~10-20 min cold on 2 cores, "
                "cached afterwards), or point CWM_TEST_KUBECONFIG at a cluster, or set "
                "CWM_SKIP_CLUSTER=1 to skip the cluster tests on purpose."
            )
        return cls(**paths)



def _https_get(url: str, ctx: ssl.SSLContext, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def kubeconfig_yaml(server: str, ca_pem: bytes, user: str, cert_pem: bytes, key_pem: bytes) -> str:
    """A kubeconfig with everything embedded (kopf, kubectl and the Python client all read it)."""
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cwm-test", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}}],
        "contexts": [{"name": user, "context": {"cluster": "cwm-test", "user": user, "namespace": "default"}}],
        "current-context": user,
    }
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class LocalControlPlane:
    """etcd → kube-apiserver → kube-controller-manager on loopback, in a temporary folder."""

    bins: Binaries
    workdir: Path
    ca: CertificateAuthority = field(default_factory=CertificateAuthority)
    #: Serve a node (node.py): API on the node's bridge address, Service range and admission as
    #: a kubelet needs them, and kube-controller-manager running its default controller set.
    with_node: bool = False
    components: list[Component] = field(default_factory=list)
    server: str = ""
    kubeconfig: Path = field(init=False)

    def __post_init__(self) -> None:
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.timings: dict[str, float] = {}  # seconds per start-up phase
        self._users: dict[tuple[str, tuple[str, ...]], Path] = {}

    def _component(self, name: str, argv: list[str]) -> Component:
        component = Component(name, argv, self.workdir / f"{name}.log")
        self.components.append(component)
        component.start()
        return component

    def _expect_alive(self, component: Component) -> None:
        if not component.alive():
            raise ControlPlaneError(f"{component.name} exited early (code {component.process.returncode})")  # type: ignore[union-attr]

    def start_etcd(self) -> str:
        client, peer = free_port(), free_port()
        url = f"http://127.0.0.1:{client}"
        etcd = self._component("etcd", [
            str(self.bins.etcd),
            "--name=cwm-test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=cwm-test=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ])

        def healthy() -> bool:
            self._expect_alive(etcd)
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                return json.loads(r.read()).get("health") == "true"

        wait_until(healthy, 30, "etcd /health")
        return url

    def start_apiserver(self, etcd_url: str) -> None:
        pki = self.workdir / "pki"
        pki.mkdir()
        (pki / "ca.crt").write_bytes(self.ca.cert_pem)
        serving_crt, serving_key = self.ca.serving(
            ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             f"kubernetes.default.svc.{node.CLUSTER_DOMAIN}"],
            ["127.0.0.1", "10.0.0.1", node.NODE_IP, node.KUBERNETES_SERVICE_IP],
        ).write(pki, "apiserver")
        sa_key, sa_pub = pki / "service-account.key", pki / "service-account.pub"
        private, public = signing_key_pair()
        sa_key.touch(mode=0o600)
        sa_key.write_bytes(private)
        sa_pub.write_bytes(public)
        port = free_port()
        address = node.NODE_IP if self.with_node else "127.0.0.1"
        self.server = f"https://{address}:{port}"
        apiserver = self._component("kube-apiserver", [
            str(self.bins.kube_apiserver),
            f"--etcd-servers={etcd_url}",
            f"--bind-address={address}",
            f"--advertise-address={address}",
            f"--secure-port={port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={serving_crt}",
            f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            "--allow-privileged=true",
            "--profiling=false",
            *(self._node_apiserver_flags(pki) if self.with_node else [
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",
            ]),
        ])
        self.kubeconfig.write_text(self._user_kubeconfig(ADMIN_USER, ("system:masters",)))
        admin = self.ca.client(ADMIN_USER, ("system:masters",)).write(pki, "admin")
        ctx = ssl.create_default_context(cadata=self.ca.cert_pem.decode())
        ctx.load_cert_chain(*admin)

        def ready() -> bool:
            self._expect_alive(apiserver)
            status, _ = _https_get(f"{self.server}/readyz", ctx)
            if status != 200:
                return False
            status, _ = _https_get(f"{self.server}/api/v1/namespaces/default", ctx)
            return status == 200

        wait_until(ready, 90, "kube-apiserver /readyz and the default namespace")

    def _node_apiserver_flags(self, pki: Path) -> list[str]:
        """With a node: the Node authorizer and NodeRestriction for the kubelet, ServiceAccount
        admission (pods get tokens), the `kubernetes` Service's endpoint kept by the lease
        reconciler, and the kubelet reached by its InternalIP with a client certificate, its
        serving certificate checked against our CA."""
        kubelet_crt, kubelet_key = self.ca.client("kube-apiserver-kubelet-client", ("system:masters",)).write(
            pki, "kubelet-client")
        return [
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={node.SERVICE_RANGE}",
            "--endpoint-reconciler-type=lease",
            f"--kubelet-client-certificate={kubelet_crt}",
            f"--kubelet-client-key={kubelet_key}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def start_controller_manager(self) -> None:
        folder = self.workdir / "kube-controller-manager"
        folder.mkdir()
        kubeconfig = folder / "kubeconfig"
        # In system:masters so one identity may run every controller (as envtest's admin does).
        kubeconfig.write_text(self._user_kubeconfig("system:kube-controller-manager", ("system:masters",)))
        port = free_port()
        kcm = self._component("kube-controller-manager", [
            str(self.bins.kube_controller_manager),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--authentication-skip-lookup=true",  # no request-header CA: we run no aggregated APIs
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={folder}",
            *(self._node_controller_flags() if self.with_node else [f"--controllers={','.join(CONTROLLERS)}"]),
        ])
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        def healthy() -> bool:
            self._expect_alive(kcm)
            return _https_get(f"https://127.0.0.1:{port}/healthz", insecure)[0] == 200

        wait_until(healthy, 60, "kube-controller-manager /healthz")

    def _node_controller_flags(self) -> list[str]:
        """With a node, the default controller set (job, endpointslice, node-lifecycle, ...: pods
        really run, so nothing else writes their status), the root CA published to every
        namespace (`kube-root-ca.crt`, part of each pod's token volume) and the Service range."""
        pki = self.workdir / "pki"
        return [
            "--controllers=*",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'service-account.key'}",
            f"--service-cluster-ip-range={node.SERVICE_RANGE}",
            "--node-monitor-period=2s",
        ]

    def _user_kubeconfig(self, user: str, groups: tuple[str, ...]) -> str:
        pair = self.ca.client(user, groups)
        return kubeconfig_yaml(self.server, self.ca.cert_pem, user, pair.cert_pem, pair.key_pem)

    def kubeconfig_for(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig authenticating as `user` in `groups` with its own client certificate."""
        key = (user, tuple(groups))
        if key not in self._users:
            path = self.workdir / f"user-{len(self._users)}.kubeconfig"
            path.write_text(self._user_kubeconfig(user, tuple(groups)))
            self._users[key] = path
        return self._users[key]

    def start(self, before_controllers: Callable[[], None] = lambda: None) -> None:
        """etcd, then kube-apiserver, then `before_controllers()` (install CRDs: the garbage
        collector discovers resources when it starts, and only every 30 s afterwards), then
        kube-controller-manager. Any failure stops what was started and raises with log tails."""
        def timed(phase: str, step: Callable[[], T]) -> T:
            t0 = time.monotonic()
            result = step()
            self.timings[phase] = time.monotonic() - t0
            return result

        try:
            etcd_url = timed("etcd", self.start_etcd)
            timed("kube-apiserver", lambda: self.start_apiserver(etcd_url))
            timed("crds", before_controllers)
            timed("kube-controller-manager", self.start_controller_manager)
        except Exception as e:
            self.stop()
            raise ControlPlaneError(f"control plane failed to start: {e}\n{self.logs()}") from e

    def stop(self) -> None:
        """Stop in reverse order; every process is reaped even if an earlier stop fails."""
        for component in reversed(self.components):
            with contextlib.suppress(Exception):
                component.stop()

    def logs(self, lines: int = 40) -> str:
        return "\n".join(
            f"----- {c.name} (last {lines} lines of {c.log_path}) -----\n{c.tail(lines)}" for c in self.components
        )


def load_crd(path: Path) -> dict[str, Any]:
    """The CustomResourceDefinition document in `path`, with a clear error if it is absent."""
    if not path.is_file():
        raise ControlPlaneError(f"CRD file missing: {path}")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise ControlPlaneError(f"{path}: expected one CustomResourceDefinition, found {len(crds)}")
    return crds[0]


class Kube:
    """What the `kube` fixture yields: a cluster to test against, with kubectl and helpers.

    Attributes: `kubeconfig` (admin kubeconfig path), `api_client` (a kubernetes.client.ApiClient
    for that admin), `local` (the LocalControlPlane, or None on an external cluster), `node` (the
    LocalNode when one runs here, else None).
    """

    def __init__(self, kubeconfig: Path, kubectl_bin: Path, local: LocalControlPlane | None, workdir: Path,
                 node: node.LocalNode | None = None) -> None:
        from kubernetes import config

        self.kubeconfig = kubeconfig
        self.kubectl_bin = kubectl_bin
        self.local = local
        self.node = node
        self.workdir = workdir
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))

    # ----- kubectl and clients -------------------------------------------------------------
    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (admin unless `kubeconfig` is given); text output."""
        env = {**os.environ, "KUBECACHEDIR": str(self.workdir / "kubectl-cache")}
        env.pop("KUBECONFIG", None)
        argv = [str(self.kubectl_bin), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env)
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def kubeconfig_for(self, user: str, groups: tuple[str, ...] | list[str] = ()) -> Path:
        """A kubeconfig for a restricted user (client certificate here; impersonation outside)."""
        if self.local is not None:
            return self.local.kubeconfig_for(user, tuple(groups))
        config = yaml.safe_load(self.kubeconfig.read_text())
        ctx_name = config["current-context"]
        ctx = next(c for c in config["contexts"] if c["name"] == ctx_name)
        admin_user = next(u for u in config["users"] if u["name"] == ctx["context"]["user"])
        user_entry = {"name": f"as-{user}", "user": {**admin_user["user"], "as": user, "as-groups": list(groups)}}
        config["users"].append(user_entry)
        config["contexts"].append({"name": f"as-{user}", "context": {**ctx["context"], "user": f"as-{user}"}})
        config["current-context"] = f"as-{user}"
        # No ':' in the name: the Python client splits a kubeconfig path on ':' like $KUBECONFIG.
        path = self.workdir / f"as-{user.replace(':', '_')}-{abs(hash(tuple(groups)))}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path

    def user_client(self, user: str, groups: tuple[str, ...] | list[str] = ()) -> Any:
        """A kubernetes.client.ApiClient authenticated as `user` in `groups`, subject to RBAC."""
        from kubernetes import config

        client = config.new_client_from_config(config_file=str(self.kubeconfig_for(user, groups)))
        if self.local is None:  # the python client ignores `as:` in kubeconfigs: impersonate
            if len(groups) > 1:
                raise ControlPlaneError("on an external cluster user_client() supports one group "
                                        "(the Python client sends one Impersonate-Group header)")
            client.set_default_header("Impersonate-User", user)
            for g in groups:
                client.set_default_header("Impersonate-Group", g)
        return client

    def serviceaccount_client(self, namespace: str, name: str) -> Any:
        """An ApiClient acting as ServiceAccount `namespace/name` (what an in-cluster pod gets)."""
        user = f"system:serviceaccount:{namespace}:{name}"
        if self.local is None:  # impersonating a service account adds its groups server-side
            return self.user_client(user)
        return self.user_client(user, ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                       "system:authenticated"])

    def helm(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run helm (from tools.sh) against this cluster, with its state folders in the workdir."""
        binary = cache_dir() / "bin" / "helm"
        if not os.access(binary, os.X_OK):
            raise ControlPlaneError(f"helm not found at {binary}: install it with tests/controlplane/tools.sh "
                                    "(`make tools`)")
        env = {**os.environ, "KUBECACHEDIR": str(self.workdir / "kubectl-cache")}
        env.pop("KUBECONFIG", None)
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            env[var] = str(self.workdir / "helm" / var.split("_")[1].lower())
        argv = [str(binary), f"--kubeconfig={self.kubeconfig}", *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def logs(self, lines: int = 40) -> str:
        """The components' log tails (empty on an external cluster)."""
        return self.local.logs(lines) if self.local else "(external cluster: no component logs)"

    # ----- objects -------------------------------------------------------------------------
    def apply_crd(self, crd: dict[str, Any], replace: bool = True) -> None:
        """Create or replace a CRD and wait until it is Established and its API is served."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        api = client.ApiextensionsV1Api(self.api_client)
        name = crd["metadata"]["name"]
        try:
            api.create_custom_resource_definition(crd)
        except ApiException as e:
            if e.status != 409:
                raise
            if replace:
                current = api.read_custom_resource_definition(name)
                body = {**crd, "metadata": {**crd["metadata"], "resourceVersion": current.metadata.resource_version}}
                api.replace_custom_resource_definition(name, body)

        def established() -> bool:
            got = api.read_custom_resource_definition(name)
            return any(c.type == "Established" and c.status == "True" for c in got.status.conditions or [])

        wait_until(established, 30, f"CRD {name} to be Established")
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        version = next(v["name"] for v in crd["spec"]["versions"] if v.get("served", True))
        custom = client.CustomObjectsApi(self.api_client)
        wait_until(lambda: custom.list_cluster_custom_object(group, version, plural, limit=1) is not None,
                   30, f"the {plural}.{group} API to be served")

    def wait_for(self, check: Callable[[], T | None], timeout: float = 30, what: str = "a condition") -> T:
        """Poll `check` until truthy (the cluster is eventually consistent: GC, namespaces)."""
        return wait_until(check, timeout, what)

    # ----- lifecycle helpers (see lifecycle.py) --------------------------------------------
    def _no_node(self, what: str) -> None:
        """Writing a status by hand is only honest where nothing else writes it: with a node, the
        Job controller and the kubelet do (let the pods run instead)."""
        if self.node is not None:
            raise ControlPlaneError(f"{what}: this cluster runs a node, so the controllers write this "
                                    "status; run the pods instead of faking their outcome")

    def start_job(self, name: str, namespace: str) -> dict[str, Any]:
        self._no_node("start_job")
        return lifecycle.start_job(self.api_client, name, namespace)

    def complete_job(self, name: str, namespace: str) -> dict[str, Any]:
        self._no_node("complete_job")
        return lifecycle.complete_job(self.api_client, name, namespace)

    def fail_job(self, name: str, namespace: str, reason: str = "BackoffLimitExceeded",
                 message: str = "Job has reached the specified backoff limit") -> dict[str, Any]:
        self._no_node("fail_job")
        return lifecycle.fail_job(self.api_client, name, namespace, reason, message)

    def set_pytorchjob_condition(self, name: str, namespace: str, type: str, status: str = "True",
                                 reason: str | None = None, message: str = "") -> dict[str, Any]:
        self._no_node("set_pytorchjob_condition")
        return lifecycle.set_pytorchjob_condition(self.api_client, name, namespace, type, status, reason, message)

    def start_pytorchjob(self, name: str, namespace: str) -> dict[str, Any]:
        self._no_node("start_pytorchjob")
        return lifecycle.start_pytorchjob(self.api_client, name, namespace)

    def complete_pytorchjob(self, name: str, namespace: str) -> dict[str, Any]:
        self._no_node("complete_pytorchjob")
        return lifecycle.complete_pytorchjob(self.api_client, name, namespace)

    def fail_pytorchjob(self, name: str, namespace: str, message: str = "pytorch worker failed") -> dict[str, Any]:
        self._no_node("fail_pytorchjob")
        return lifecycle.fail_pytorchjob(self.api_client, name, namespace, message)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.api_client.close()


def _kubectl_for_external() -> Path:
    built = bin_dir() / "kubectl"
    if os.access(built, os.X_OK):
        return built
    found = shutil.which("kubectl")
    if not found:
        raise ControlPlaneError("CWM_TEST_KUBECONFIG is set but no kubectl: build it with "
                                f"{BUILD_SCRIPT.relative_to(REPO)} or put one on PATH")
    return Path(found)


WORKDIR_PREFIX = "cwm-controlplane-"


def _sweep_stale_workdirs() -> None:
    """Remove work folders of runs that were SIGKILLed (their processes died with them)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            os.kill(int((folder / "owner.pid").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):
            continue  # no pid file yet, or not ours to judge


def _start_local(workdir: Path, docs: list[dict[str, Any]], with_node: bool,
                 project_images: bool) -> tuple[Kube, LocalControlPlane, node.LocalNode | None]:
    """Start a control plane (and a node when `with_node`) and install the CRDs. On failure
    everything started is stopped and ControlPlaneError carries the components' log tails."""
    bins = Binaries.find()
    plane = LocalControlPlane(bins, workdir, with_node=with_node)
    the_node: node.LocalNode | None = None
    kube: Kube | None = None
    if with_node:
        missing = [b for b in NODE_BINARIES if not os.access(bin_dir() / b, os.X_OK)]
        if missing:
            raise ControlPlaneError(f"node binaries missing in {bin_dir()}: {', '.join(missing)}. Build them "
                                    "with `make node` (tests/controlplane/build.sh and node-deps.sh)")
        try:
            programs = node.HostPrograms.find(cache_dir(), read_versions()["COREDNS_VERSION"])
        except node.NodeError as e:
            raise ControlPlaneError(str(e)) from e
        the_node = node.LocalNode(plane, bin_dir(), programs, read_versions()["COREDNS_VERSION"])

    def install_crds() -> None:
        nonlocal kube
        kube = Kube(plane.kubeconfig, bins.kubectl, plane, workdir, the_node)
        for doc in docs:
            kube.apply_crd(doc)

    try:
        if the_node is not None:
            the_node.prepare()
        plane.start(install_crds)
        if the_node is not None:
            the_node.start(wait_until, project_images=project_images)
    except Exception as e:
        logs = plane.logs()
        if the_node is not None:
            the_node.stop()
        plane.stop()
        if isinstance(e, ControlPlaneError):
            raise
        raise ControlPlaneError(f"test node failed to start: {e}\n{logs}") from e
    assert kube is not None
    return kube, plane, the_node


@contextlib.contextmanager
def connect(crds: list[Path] | None = None, with_node: bool = False, project_images: bool = False) -> Iterator[Kube]:
    """Yield a `Kube` with our CRDs installed; stop everything (even after errors) on exit.

    `with_node`: also run a node (node.py) so pods really run; the controller manager then runs
    its default controllers. `project_images`: load the project's images from Docker into that
    node at start (else on demand: `kube.node.load_project_images`). With `CWM_TEST_KUBECONFIG`
    set, that cluster is used and left running (our CRD is applied, the PyTorchJob CRD only if
    the cluster has none: a real training operator's wins); it is trusted to have nodes.
    """
    crd_paths = crds if crds is not None else [CWM_CRD, PYTORCHJOB_CRD]
    docs = [load_crd(p) for p in crd_paths]
    _sweep_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    (workdir / "owner.pid").write_text(str(os.getpid()))
    local: LocalControlPlane | None = None
    the_node: node.LocalNode | None = None
    kube: Kube | None = None
    try:
        external = os.environ.get("CWM_TEST_KUBECONFIG")
        if external:
            kube = Kube(Path(external).resolve(), _kubectl_for_external(), None, workdir)
            for doc in docs:
                kube.apply_crd(doc, replace=doc["spec"]["group"] != "kubeflow.org")
        else:
            kube, local, the_node = _start_local(workdir, docs, with_node, project_images)
        yield kube
    finally:
        if kube is not None:
            kube.close()
        if the_node is not None:
            the_node.stop()
        if local is not None:
            local.stop()
        if os.environ.get("CWM_KEEP_CONTROLPLANE_DIR") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


def cluster_state_dir() -> Path:
    """Where `make cluster` keeps its kubeconfig, pid and log: `<cache>/cluster`."""
    return cache_dir() / "cluster"


def _serve(with_node: bool) -> None:
    """Run a cluster until SIGTERM/Ctrl-C; write its kubeconfig where `make cluster` reads it."""
    state = cluster_state_dir()
    with connect(with_node=with_node, project_images=with_node) as kube:
        parts = dict(kube.local.timings) if kube.local else {}
        parts.update({f"node {k}": v for k, v in (kube.node.timings if kube.node else {}).items()})
        shutil.copyfile(kube.kubeconfig, state / "kubeconfig.partial")
        (state / "kubeconfig.partial").rename(state / "kubeconfig")
        notes = "".join(f"\nnote: {n}" for n in (kube.node.notes if kube.node else []))
        print("cluster up (" + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + ")" + notes, flush=True)
        print(f"export KUBECONFIG={state / 'kubeconfig'}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds `connect`: stops everything
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            (state / "kubeconfig").unlink(missing_ok=True)


def _detach(with_node: bool, timeout: float = 600) -> int:
    """Start `_serve` as a background process (`make cluster`); print the kubeconfig path once
    the cluster is up, or the log tail if it fails."""
    state = cluster_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    pid_file, log_path, kubeconfig = state / "pid", state / "cluster.log", state / "kubeconfig"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
        print(f"a cluster is already running (pid {pid_file.read_text()}): KUBECONFIG={kubeconfig}; "
              "stop it with `make cluster-down`", file=sys.stderr)
        return 1
    kubeconfig.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "tests.controlplane.cluster", *(["--node"] if with_node else [])]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not kubeconfig.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.terminate()
            pid_file.unlink(missing_ok=True)
            print(log_path.read_text(errors="replace")[-6000:], file=sys.stderr)
            print(f"cluster failed to start (log: {log_path})", file=sys.stderr)
            return 1
        time.sleep(0.5)
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith(("cluster up", "note:")):
            print(line, file=sys.stderr)
    print(kubeconfig)
    return 0


def _down(timeout: float = 120) -> int:
    """Stop the cluster `make cluster` started, then sweep what a killed node could leave."""
    pid_file = cluster_state_dir() / "pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pid = 0
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        if pid:
            os.kill(pid, signal.SIGKILL)  # its components die with it (PR_SET_PDEATHSIG)
            print(f"cluster pid {pid} did not stop in {timeout:.0f} s: killed", file=sys.stderr)
    pid_file.unlink(missing_ok=True)
    (cluster_state_dir() / "kubeconfig").unlink(missing_ok=True)
    try:
        leftovers = node.sweep_if_unowned()
    except node.NodeError as e:  # another process (a test session) runs the node: not ours to stop
        print(f"cluster stopped; {e}", file=sys.stderr)
        return 0
    print("cluster stopped" + (f"; swept: {'; '.join(leftovers)}" if leftovers else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.controlplane.cluster [--node] [--detach | --down]`.

    Without flags: run a control plane until Ctrl-C (kopf, kubectl, helm against a real API
    server) and print its kubeconfig. `--node`: with a node, so pods run. `--detach` (make
    cluster): in the background, print the kubeconfig path when up. `--down` (make cluster-down):
    stop it and sweep."""
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane.cluster")
    parser.add_argument("--node", action="store_true", help="run a node too (pods run)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--detach", action="store_true", help="start in the background, print the kubeconfig path")
    group.add_argument("--down", action="store_true", help="stop what --detach started and sweep")
    group.add_argument("--prune-images", action="store_true", help="delete the node's image store (GBs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.prune_images:
        try:
            print(node.prune_image_store(), file=sys.stderr)
        except node.NodeError as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    if args.down:
        return _down()
    if args.detach:
        return _detach(args.node)
    cluster_state_dir().mkdir(parents=True, exist_ok=True)
    _serve(args.node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
