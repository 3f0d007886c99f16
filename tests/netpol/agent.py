"""kube-network-policies (v0.8.0, built by tests/netpol/build.sh): the agent that makes the test
node enforce NetworkPolicy, run as a process beside the kubelet.

What it needs, found by reading its v0.8.0 main and trying it here:
- the node's network namespace (the host's, where the bridge CNI and kube-proxy work) and
  CAP_NET_ADMIN there: it installs an nftables table ``inet kube-network-policies`` whose chains
  send the packets of pods selected by a policy to an NFQUEUE, and answers each verdict in user
  space. Kernel: nf_tables and nfnetlink_queue; pod-to-pod traffic on one bridge reaches those
  hooks only with br_netfilter (``net.bridge.bridge-nf-call-iptables=1``), as kube-proxy needs.
- the API through ``rest.InClusterConfig()`` only (it has no --kubeconfig): the
  ``KUBERNETES_SERVICE_HOST``/``PORT`` variables and a token and CA at
  ``/var/run/secrets/kubernetes.io/serviceaccount/``. A process on the host cannot have that path
  without changing the host, so :func:`agent_argv` starts it in a private mount namespace
  (``unshare --mount``) with a tmpfs over ``/run`` holding a ServiceAccount token from the
  TokenRequest API, under the module's own ClusterRole (list/watch pods, namespaces and
  NetworkPolicies).
- ``--disable-nri`` (containerd's NRI socket is optional: pod IPs then come from the API, with the
  start-up race issues.k8s.io/85966 describes) and ``--hostname-override`` = the Node's name.
- ``--netfilter-bug-1766-fix=false`` on kernels >= 6.12 (the module's own advice).
On stop (SIGTERM) it removes its nftables table.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane.cluster import Component, free_port, wait_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_SCRIPT = HERE / "build.sh"
TABLE = "kube-network-policies"
SA_NAMESPACE, SA_NAME = "kube-system", "kube-network-policies"
SA_DIR = "/run/secrets/kubernetes.io/serviceaccount"  # /var/run is /run on Debian


class NetpolError(RuntimeError):
    """The agent is not built, could not start, or cannot run on this host."""


def read_version() -> str:
    for line in (HERE / "versions.env").read_text().splitlines():
        if line.startswith("KUBE_NETWORK_POLICIES_VERSION="):
            return line.split("=", 1)[1].strip()
    raise NetpolError(f"{HERE / 'versions.env'}: no KUBE_NETWORK_POLICIES_VERSION")


def build_dir() -> Path:
    cache = Path(os.environ.get("CWM_CACHE") or REPO / ".cache").resolve()
    return cache / "netpol" / f"kube-network-policies-{read_version()}"


def binary() -> Path:
    path = build_dir() / "bin" / "kube-network-policies"
    if not (build_dir() / "STAMP").is_file() or not os.access(path, os.X_OK):
        raise NetpolError(f"kube-network-policies not built in {build_dir()}: run "
                          f"`{BUILD_SCRIPT.relative_to(REPO)}` (`make netpol`)")
    return path


def host_problems() -> list[str]:
    """What this host lacks for the agent (empty: it can run). Checked, not assumed."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root: the agent needs CAP_NET_ADMIN in the node's network namespace")
    if not Path("/proc/net/netfilter/nfnetlink_queue").exists():
        problems.append("no nfnetlink_queue in the kernel (modprobe nfnetlink_queue)")
    bridge = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if not bridge.exists() or bridge.read_text().strip() != "1":
        problems.append("br_netfilter off: traffic between pods on one bridge bypasses nftables "
                        "(modprobe br_netfilter; sysctl net.bridge.bridge-nf-call-iptables=1)")
    for tool in ("unshare", "nft"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            problems.append(f"{tool} not on PATH")
            return problems
    queue = nft_queue_problem()
    return problems + ([queue] if queue else [])


def nft_queue_problem() -> str | None:
    """Whether nftables' `queue` statement works (the agent sends first packets to user space
    with it), tried in a throw-away network namespace so the host's rules are never touched.
    On a kernel built without CONFIG_NFT_QUEUE it fails with ENOENT."""
    script = ("nft add table inet cwm_probe && nft add chain inet cwm_probe c "
              "'{ type filter hook forward priority 0 ; }' && "
              "nft add rule inet cwm_probe c queue num 100 bypass")
    done = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    words = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
    return (f"nftables cannot queue packets to user space here ({words}): the kernel lacks "
            "CONFIG_NFT_QUEUE, which kube-network-policies needs for every policy verdict")


def rbac_objects() -> list[dict[str, Any]]:
    """The module's ClusterRole, binding and ServiceAccount (its DaemonSet left out)."""
    docs = [d for d in yaml.safe_load_all((build_dir() / "install.yaml").read_text()) if d]
    kept = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "ServiceAccount")]
    if len(kept) != 3:
        raise NetpolError(f"{build_dir() / 'install.yaml'}: expected a ClusterRole, a binding and a "
                          f"ServiceAccount, found {[d['kind'] for d in kept]}")
    return kept


def agent_argv(binary_path: Path, secrets: Path, node_name: str, metrics_port: int) -> list[str]:
    """unshare → tmpfs over /run (this process only) → token and CA in place → exec the agent."""
    agent = [str(binary_path), f"--hostname-override={node_name}", "--disable-nri",
             "--netfilter-bug-1766-fix=false", f"--metrics-bind-address=127.0.0.1:{metrics_port}", "-v=2"]
    script = (f"mount -t tmpfs -o mode=0755 cwm-netpol /run && mkdir -p {SA_DIR} && "
              f"cp {shlex.quote(str(secrets / 'token'))} {shlex.quote(str(secrets / 'ca.crt'))} {SA_DIR}/ && "
              f"exec {shlex.join(agent)}")
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]


def _apply(api_client: Any, objects: list[dict[str, Any]]) -> None:
    from kubernetes import utils
    from kubernetes.client.rest import ApiException

    for obj in objects:
        try:
            utils.create_from_dict(api_client, obj)
        except utils.FailToCreateError as e:
            if not all(isinstance(x, ApiException) and x.status == 409 for x in e.api_exceptions):
                raise


def table_present() -> bool:
    return subprocess.run(["nft", "list", "table", "inet", TABLE], capture_output=True).returncode == 0


@dataclass
class NetworkPolicyAgent:
    """One agent for the node ``node_name`` of the cluster behind ``api_client``."""

    api_client: Any
    server: str          # https://host:port of the API server, reachable from the node
    ca_pem: bytes        # the API server's CA
    node_name: str
    workdir: Path
    component: Component | None = None

    def start(self, timeout: float = 60) -> None:
        from kubernetes import client

        problems = host_problems()
        if problems:
            raise NetpolError("kube-network-policies cannot run here: " + "; ".join(problems))
        if table_present():
            raise NetpolError(f"nftables table inet {TABLE} exists: another agent runs on this host")
        path = binary()
        _apply(self.api_client, rbac_objects())
        token = client.CoreV1Api(self.api_client).create_namespaced_service_account_token(
            SA_NAME, SA_NAMESPACE, {"spec": {"expirationSeconds": 86400}}).status.token
        secrets = self.workdir / "netpol-secrets"
        secrets.mkdir(mode=0o700, exist_ok=True)
        (secrets / "token").write_text(token)
        (secrets / "ca.crt").write_bytes(self.ca_pem)
        host, _, port = self.server.removeprefix("https://").rpartition(":")
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "KUBERNETES_SERVICE_HOST": host.strip("[]"), "KUBERNETES_SERVICE_PORT": port}
        self.component = Component("kube-network-policies",
                                  agent_argv(path, secrets, self.node_name, free_port()),
                                  self.workdir / "kube-network-policies.log", env=env)
        self.component.start()

        def ready() -> bool:
            if not self.component or not self.component.alive():
                raise NetpolError(f"kube-network-policies exited:\n{self.logs()}")
            return table_present()

        try:
            wait_until(ready, timeout, f"nftables table inet {TABLE}")
        except TimeoutError as e:
            self.stop()
            raise NetpolError(f"{e}\n{self.logs()}") from None

    def logs(self, lines: int = 40) -> str:
        return self.component.tail(lines) if self.component else "(not started)"

    def stop(self) -> None:
        """SIGTERM (the agent removes its table), then make sure no table is left behind."""
        if self.component is not None:
            self.component.stop(grace=10)
        if table_present():
            subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True)
