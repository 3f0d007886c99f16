"""Kubeflow's training operator (v1.8.1, built by tests/kubeflow/build.sh) as a process.

Why a process and not a pod: the test clusters' kube-apiserver is itself a process on this host,
so the operator's admission webhook is reached at ``https://127.0.0.1:<port>`` through a URL-based
ValidatingWebhookConfiguration. That needs no node, no Service routing (kube-proxy) and no extra
image, so the same helper runs on the API-only control plane (pods stay Pending there, but the
operator's reconciliation -- pods, Services, PET_*/MASTER_ADDR -- is fully observable) and on the
node-backed one. On a real cluster users install Kubeflow's own manifests instead (a Deployment,
webhook through its Service); :func:`installed` detects that.

What the operator needs besides its CRD, and what this module supplies:
- a Secret ``training-operator-webhook-cert`` in its namespace (``MY_POD_NAMESPACE``): its cert
  rotator (open-policy-agent/cert-controller) keeps a valid CA + serving certificate it finds
  there, so :func:`webhook_certs` makes one whose serving certificate also names 127.0.0.1;
- the certificate files in ``/tmp/k8s-webhook-server/serving-certs`` (a path compiled into the
  operator; in a pod the Secret is mounted there): one operator per host at a time, guarded by a
  lock file;
- the ValidatingWebhookConfiguration ``validator.training-operator.kubeflow.org`` (from the
  module's manifests, each webhook pointed at the loopback URL and limited to the watched
  namespace, so other tests' PyTorchJobs never depend on this process);
- RBAC: the module's ClusterRole, bound to the identity the process runs as;
- an init-container template: the built-in one pulls ``alpine:3.10`` (no registry here) and sets
  no security context (refused by Pod Security ``restricted``); ours runs a DNS wait for the
  master in a local image, non-root, with every capability dropped.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import fcntl
import ipaddress
import os
import ssl
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.controlplane.cluster import (
    PYTORCHJOB_CRD,
    Component,
    cache_dir,
    free_port,
    load_crd,
    wait_until,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_SCRIPT = HERE / "build.sh"
SECRET_NAME = "training-operator-webhook-cert"
SERVICE_NAME = "training-operator"
WEBHOOK_CONFIG = "validator.training-operator.kubeflow.org"
CA_NAME = "training-operator-ca"  # the rotator checks its CA against this name
CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")  # compiled into the operator
ROLE_NAME = "training-operator"


class TrainingOperatorError(RuntimeError):
    """The training operator is not built, not installed, or did not become ready."""


def read_version() -> str:
    """TRAINING_OPERATOR_VERSION, as versions.env pins it for build.sh."""
    pins = dict(line.strip().split("=", 1) for line in
                (HERE / "versions.env").read_text().splitlines() if "=" in line)
    if "TRAINING_OPERATOR_VERSION" not in pins:
        raise TrainingOperatorError(f"{HERE / 'versions.env'}: no TRAINING_OPERATOR_VERSION")
    return pins["TRAINING_OPERATOR_VERSION"]


def build_dir() -> Path:
    """Where build.sh puts the binary and manifests (the same rule as the script)."""
    return cache_dir() / "kubeflow" / f"training-operator-{read_version()}"


@dataclass(frozen=True)
class Build:
    """The built operator and the manifests of the same module version."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "training-operator"

    @classmethod
    def find(cls) -> Build:
        build = cls(build_dir())
        if not (build.root / "STAMP").is_file() or not os.access(build.binary, os.X_OK):
            raise TrainingOperatorError(
                f"Kubeflow training operator not built in {build.root}: run "
                f"`{BUILD_SCRIPT.relative_to(REPO)}` (`make kubeflow`; ~1.5 min warm Go cache, "
                "cached afterwards)")
        return build

    def manifest(self, relative: str) -> list[dict[str, Any]]:
        path = self.root / "manifests" / relative
        if not path.is_file():
            raise TrainingOperatorError(f"manifest missing: {path} (rebuild with {BUILD_SCRIPT})")
        return [d for d in yaml.safe_load_all(path.read_text()) if d]

    def crd(self, plural: str = "pytorchjobs") -> dict[str, Any]:
        (doc,) = self.manifest(f"crds/kubeflow.org_{plural}.yaml")
        return doc


# ------------------------------------------------------------------------------------------
# Pure pieces: certificates, webhook configuration, init-container template, command line


@dataclass(frozen=True)
class WebhookCerts:
    """PEM CA (RSA, PKCS#1: the rotator parses it so when it renews) and serving pair."""

    ca_pem: bytes
    ca_key_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def secret_data(self) -> dict[str, str]:
        files = {"ca.crt": self.ca_pem, "ca.key": self.ca_key_pem, "tls.crt": self.cert_pem,
                 "tls.key": self.key_pem}
        return {k: base64.b64encode(v).decode() for k, v in files.items()}


def webhook_certs(namespace: str, service: str = SERVICE_NAME, ips: tuple[str, ...] = ("127.0.0.1",)
                  ) -> WebhookCerts:
    """A CA named as the rotator expects and a serving certificate for ``<service>.<ns>.svc``
    (what the rotator verifies) and ``ips`` (what the API server dials). Valid for a year, well
    beyond the rotator's 90-day look-ahead, so it keeps them instead of minting its own."""
    def pem_key(key: rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    now = dt.datetime.now(dt.UTC)
    ca_key, key = (rsa.generate_private_key(65537, 2048) for _ in range(2))
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
                            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "training-operator")])
    ca = (x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectAlternativeName([x509.DNSName(CA_NAME)]), critical=False)
          .sign(ca_key, hashes.SHA256()))
    dns = f"{service}.{namespace}.svc"
    sans: list[x509.GeneralName] = [x509.DNSName(dns)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
            .issuer_name(ca_subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return WebhookCerts(ca.public_bytes(pem), pem_key(ca_key), cert.public_bytes(pem), pem_key(key))


def webhook_configuration(upstream: dict[str, Any], url: str, ca_pem: bytes, schemes: tuple[str, ...],
                          namespaces: tuple[str, ...]) -> dict[str, Any]:
    """The module's ValidatingWebhookConfiguration, renamed as the operator expects, keeping the
    webhooks of the enabled ``schemes`` (a webhook with failurePolicy Fail and no server would
    block every other kind), each called at ``url`` + its path, for ``namespaces`` only."""
    config = copy.deepcopy(upstream)
    config["metadata"] = {"name": WEBHOOK_CONFIG, "labels": {"app.kubernetes.io/part-of": "cwm-pipeline-tests"}}
    kept = []
    for hook in config["webhooks"]:
        if not any(f"{s}s" in hook["rules"][0]["resources"] for s in schemes):
            continue
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": url.rstrip("/") + path,
                                "caBundle": base64.b64encode(ca_pem).decode()}
        hook["namespaceSelector"] = {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": list(namespaces)}]}
        kept.append(hook)
    if not kept:
        raise TrainingOperatorError(f"no upstream webhook matches the schemes {schemes}")
    config["webhooks"] = kept
    return config


def init_container_template(image: str, wait_with: str = "python3") -> str:
    """The operator's init container for Worker pods (a Go template: .MasterAddr, .MaxTries):
    wait until the master's Service name resolves, with Python (present in the trainer image)
    or busybox's nslookup (``wait_with="nslookup"``) instead of alpine's, fit for Pod Security
    ``restricted``."""
    if wait_with == "python3":
        wait = ("import socket,sys,time\n"
                "for _ in range({{.MaxTries}}):\n"
                "    try:\n"
                "        socket.getaddrinfo('{{.MasterAddr}}', None); sys.exit(0)\n"
                "    except OSError:\n"
                "        print('waiting for master {{.MasterAddr}}', flush=True); time.sleep(2)\n"
                "sys.exit(1)\n")
        command = ["python3", "-c", wait]
    elif wait_with == "nslookup":
        # busybox's nslookup exits 1 when any search domain answers NXDOMAIN, even after it found
        # the name in another: success is a "Name:" line in its answer.
        command = ["/bin/sh", "-c", "for i in $(seq {{.MaxTries}}); do nslookup {{.MasterAddr}} 2>/dev/null "
                   "| grep -q '^Name:' && exit 0; echo waiting for master {{.MasterAddr}}; sleep 2; done; exit 1"]
    else:
        raise TrainingOperatorError(f"init container wait_with={wait_with!r}: python3 or nslookup")
    container = {
        "name": "init-pytorch", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": command,
        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True, "runAsNonRoot": True, "runAsUser": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    return yaml.safe_dump([container], sort_keys=False, width=1000)


@dataclass(frozen=True)
class Ports:
    webhook: int
    metrics: int
    probe: int

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())


def operator_argv(binary: Path, ports: Ports, watch_namespace: str, template_file: Path,
                  init_image: str, schemes: tuple[str, ...]) -> list[str]:
    argv = [str(binary), f"--namespace={watch_namespace}", f"--webhook-server-port={ports.webhook}",
            f"--metrics-bind-address=127.0.0.1:{ports.metrics}",
            f"--health-probe-bind-address=127.0.0.1:{ports.probe}",
            f"--pytorch-init-container-image={init_image}",
            f"--pytorch-init-container-template-file={template_file}",
            "--zap-devel=false", "--zap-log-level=info"]
    return argv + [f"--enable-scheme={s}" for s in schemes]


# ------------------------------------------------------------------------------------------
# I/O: objects in the cluster, the certificate folder, the process


def installed(api_client: Any) -> bool:
    """Whether a training operator is installed in this cluster (its webhook configuration)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:
        client.AdmissionregistrationV1Api(api_client).read_validating_webhook_configuration(WEBHOOK_CONFIG)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def _create_or_replace(create: Any, replace: Any, read: Any, name: str, body: dict[str, Any],
                       *namespace: str) -> None:
    from kubernetes.client.rest import ApiException

    try:
        create(*namespace, body)
    except ApiException as e:
        if e.status != 409:
            raise
        current = read(name, *namespace)
        body = {**body, "metadata": {**body["metadata"], "resourceVersion": current.metadata.resource_version}}
        replace(name, *namespace, body)


def apply_rbac(api_client: Any, build: Build, user: str) -> None:
    """The module's ClusterRole, bound to ``user`` (the identity the process runs as)."""
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(api_client)
    (role,) = build.manifest("rbac/role.yaml")
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": f"{ROLE_NAME}-{abs(hash(user)) % 10**8}"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ROLE_NAME},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}
    _create_or_replace(rbac.create_cluster_role, rbac.replace_cluster_role, rbac.read_cluster_role,
                       ROLE_NAME, role)
    _create_or_replace(rbac.create_cluster_role_binding, rbac.replace_cluster_role_binding,
                       rbac.read_cluster_role_binding, binding["metadata"]["name"], binding)


@contextlib.contextmanager
def _cert_dir_lock() -> Iterator[None]:
    """Hold the host-wide certificate folder: the path is compiled into the operator."""
    CERT_DIR.mkdir(parents=True, exist_ok=True)
    with open(CERT_DIR.parent / ".cwm-lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingOperatorError(f"another training operator on this host holds {CERT_DIR} "
                                        "(its certificate folder is compiled in): stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class TrainingOperator:
    """One operator process watching ``namespace`` (its Secret lives there too)."""

    build: Build
    kubeconfig: Path
    namespace: str
    workdir: Path
    init_image: str
    init_wait_with: str = "python3"
    schemes: tuple[str, ...] = ("pytorchjob",)
    ports: Ports = field(default_factory=Ports.free)
    component: Component | None = None

    def install(self, api_client: Any, certs: WebhookCerts) -> None:
        """Secret and webhook configuration (the CRD and RBAC are the caller's: cluster-wide)."""
        from kubernetes import client

        core = client.CoreV1Api(api_client)
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": SECRET_NAME, "namespace": self.namespace},
                  "data": certs.secret_data()}
        _create_or_replace(core.create_namespaced_secret, core.replace_namespaced_secret,
                           core.read_namespaced_secret, SECRET_NAME, secret, self.namespace)
        (upstream,) = self.build.manifest("webhook/manifests.yaml")
        config = webhook_configuration(upstream, f"https://127.0.0.1:{self.ports.webhook}", certs.ca_pem,
                                       self.schemes, (self.namespace,))
        adm = client.AdmissionregistrationV1Api(api_client)
        _create_or_replace(adm.create_validating_webhook_configuration,
                           adm.replace_validating_webhook_configuration,
                           adm.read_validating_webhook_configuration, WEBHOOK_CONFIG, config)

    def start(self, certs: WebhookCerts) -> None:
        for name, data in (("tls.crt", certs.cert_pem), ("tls.key", certs.key_pem)):
            (CERT_DIR / name).write_bytes(data)
        template = self.workdir / "init-container.yaml"
        template.write_text(init_container_template(self.init_image, self.init_wait_with))
        argv = operator_argv(self.build.binary, self.ports, self.namespace, template,
                             self.init_image, self.schemes)
        env = {"KUBECONFIG": str(self.kubeconfig), "MY_POD_NAMESPACE": self.namespace,
               "TMPDIR": "/tmp", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self.component = Component("training-operator", argv,
                                   self.workdir / "training-operator.log", env=env)
        self.component.start()

    def wait_ready(self, timeout: float = 90) -> None:
        """/readyz turns 200 once certificates are in place and the webhook server listens."""
        def ready() -> bool:
            assert self.component is not None
            if not self.component.alive():
                raise TrainingOperatorError(f"training operator exited:\n{self.logs()}")
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.probe}/readyz", timeout=2) as r:
                return r.status == 200

        try:
            wait_until(ready, timeout, "the training operator's /readyz")
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            wait_until(lambda: _tls_answers(self.ports.webhook, ctx), 30, "its webhook server")
        except TimeoutError as e:
            raise TrainingOperatorError(f"{e}\n{self.logs()}") from None

    def logs(self, lines: int = 60) -> str:
        return self.component.tail(lines) if self.component else "(not started)"

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop()


def _tls_answers(port: int, ctx: ssl.SSLContext) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, ctx.wrap_socket(raw):
        return True


def uninstall(api_client: Any, user: str) -> None:
    """Remove what :func:`run` put outside the operator's namespace (best effort)."""
    from kubernetes import client

    adm = client.AdmissionregistrationV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    for delete in (lambda: adm.delete_validating_webhook_configuration(WEBHOOK_CONFIG),
                   lambda: rbac.delete_cluster_role_binding(f"{ROLE_NAME}-{abs(hash(user)) % 10**8}")):
        with contextlib.suppress(Exception):
            delete()


@contextlib.contextmanager
def run(api_client: Any, kubeconfig: Path, namespace: str, workdir: Path, *, init_image: str,
        user: str | None = None, init_wait_with: str = "python3") -> Iterator[TrainingOperator]:
    """Install the Secret, webhook configuration and RBAC, start the operator watching
    ``namespace``, wait until it is ready; on exit stop it and remove the webhook configuration
    (so no PyTorchJob in the cluster depends on a stopped process). ``kubeconfig`` is the
    identity it runs as (``user``, bound to the module's ClusterRole when given)."""
    build = Build.find()
    with _cert_dir_lock():
        operator = TrainingOperator(build, kubeconfig, namespace, workdir, init_image, init_wait_with)
        certs = webhook_certs(namespace)
        try:
            if user:
                apply_rbac(api_client, build, user)
            operator.install(api_client, certs)
            operator.start(certs)
            operator.wait_ready()
            yield operator
        finally:
            operator.stop()
            uninstall(api_client, user or "")


@contextlib.contextmanager
def watching(kube: Any, namespace: str, workdir: Path, **options: Any
             ) -> Iterator[TrainingOperator]:
    """The training operator watching ``namespace`` on the test cluster ``kube``, under the
    namespace's ServiceAccount and with the module's own PyTorchJob CRD (the hand-written one is
    put back afterwards). ``options``: :func:`run`'s ``init_image`` and ``init_wait_with``."""
    kube.apply_crd(Build.find().crd())
    user = f"system:serviceaccount:{namespace}:training-operator"
    kubeconfig = kube.kubeconfig_for(user, ["system:serviceaccounts", "system:authenticated",
                                            f"system:serviceaccounts:{namespace}"])
    try:
        with run(kube.api_client, kubeconfig, namespace, workdir, user=user,
                 **options) as operator:
            yield operator
    finally:
        kube.apply_crd(load_crd(PYTORCHJOB_CRD))


def main() -> None:
    """`python -m tests.kubeflow.training_operator --kubeconfig K --namespace NS`: install the
    module's PyTorchJob CRD and run the operator for NS until Ctrl-C (the user path of README's
    "Try it on a local cluster"; the API server must reach this host's loopback)."""
    import argparse
    import signal
    import sys
    import tempfile
    import time

    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--namespace", required=True, help="where PyTorchJobs are created")
    parser.add_argument("--init-image", default="ghcr.io/cwm-pipeline/cwm-trainer:0.1.0",
                        help="image of the workers' wait-for-master init container (has python3)")
    args = parser.parse_args()
    api = config.new_client_from_config(config_file=str(args.kubeconfig))
    try:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": args.namespace}})
    except ApiException as e:
        if e.status != 409:
            raise
    crd = Build.find().crd()
    _create_or_replace(client.ApiextensionsV1Api(api).create_custom_resource_definition,
                       client.ApiextensionsV1Api(api).replace_custom_resource_definition,
                       client.ApiextensionsV1Api(api).read_custom_resource_definition,
                       crd["metadata"]["name"], crd)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="cwm-kubeflow-") as workdir, \
            run(api, args.kubeconfig, args.namespace, Path(workdir), init_image=args.init_image) as op:
        print(f"training operator ready for namespace {args.namespace} (log {op.component.log_path})",
              flush=True)
        try:
            while op.component is not None and op.component.alive():
                time.sleep(2)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
