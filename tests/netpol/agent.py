"""kube-router's network-policy controller (v2.1.0, built by tests/netpol/build.sh): the agent
that makes the test node enforce NetworkPolicy, run as a process beside the kubelet.

Why kube-router: this machine kind's kernel lacks nftables' ``queue`` statement
(CONFIG_NFT_QUEUE), which SIG Network's kube-network-policies needs for every verdict; it has
iptables (with ``-m set``, ``-m physdev``, conntrack) and ipset, which kube-router's firewall
uses. Only its firewall runs: ``--run-firewall`` without its router (BGP, pod routes, CNI) or its
service proxy (kube-proxy stays the node's proxy).

How it enforces, read from its v2.1.0 source: chains ``KUBE-ROUTER-INPUT/FORWARD/OUTPUT``,
jumped to first from the filter table's built-in chains, send the traffic of every pod on this
node to a per-pod chain ``KUBE-POD-FW-*``; a pod selected by a policy gets per-policy chains
``KUBE-NWPLCY-*`` matching ipsets (``KUBE-SRC-*``/``KUBE-DST-*``) of the peers the policy allows,
and whatever no rule marks is REJECTed. Pod-to-pod traffic on one bridge reaches these chains
only with br_netfilter (``net.bridge.bridge-nf-call-iptables=1``, which the node sets for
kube-proxy). Traffic to a ClusterIP is judged after kube-proxy's DNAT, so against the backend
pod's address and port.

What it needs: root (CAP_NET_ADMIN in the node's network namespace), ``iptables``,
``iptables-save``/``-restore`` and ``ipset`` on PATH, a kubeconfig (it reads pods, namespaces,
NetworkPolicies and its Node, whose InternalIP tells it which pods are local), the Service range
(``--service-cluster-ip-range``) and the node's name. It does not remove its rules when it stops:
:func:`sweep` does (its chains are ``KUBE-*``, which the node's own sweep also removes; the
ipsets are only ours to remove).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_SCRIPT = HERE / "build.sh"
NAME = "kube-router"
#: What a started agent has installed once it synced: its top-level chain, jumped to from FORWARD.
FORWARD_CHAIN = "KUBE-ROUTER-FORWARD"
#: ipsets kube-router makes (``utils/ipset.go``, ``netpol/network_policy_controller.go``).
IPSET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-", "TMP-", "inet6:KUBE-SRC-", "inet6:KUBE-DST-")


class NetpolError(RuntimeError):
    """The agent is not built, could not start, or cannot run on this host."""


def read_version() -> str:
    for line in (HERE / "versions.env").read_text().splitlines():
        if line.startswith("KUBE_ROUTER_VERSION="):
            return line.split("=", 1)[1].strip()
    raise NetpolError(f"{HERE / 'versions.env'}: no KUBE_ROUTER_VERSION")


def build_dir() -> Path:
    cache = Path(os.environ.get("CWM_CACHE") or REPO / ".cache").resolve()
    return cache / "netpol" / f"kube-router-{read_version()}"


def binary() -> Path:
    path = build_dir() / "bin" / "kube-router"
    if not (build_dir() / "STAMP").is_file() or not os.access(path, os.X_OK):
        raise NetpolError(f"kube-router not built in {build_dir()}: run "
                          f"`{BUILD_SCRIPT.relative_to(REPO)}` (`make netpol`)")
    return path


def _missing_tools() -> list[str]:
    return [t for t in ("iptables", "iptables-save", "iptables-restore", "ipset")
            if subprocess.run(["sh", "-c", f"command -v {t}"], capture_output=True).returncode]


def host_problems() -> list[str]:
    """What this host lacks for the agent (empty: it can run). Checked, not assumed: ipset's
    hash:ip sets and iptables' set match are tried in a throw-away network namespace (ipsets
    belong to a network namespace, so the host's are never touched)."""
    if os.geteuid() != 0:
        return ["not root: kube-router needs CAP_NET_ADMIN in the node's network namespace"]
    missing = _missing_tools()
    if missing:
        return [f"{', '.join(missing)} not on PATH (Debian: apt-get install iptables ipset; "
                "`make netpol` installs them)"]
    script = ("ipset create cwm-probe hash:ip timeout 0 && "
              "ipset add cwm-probe 198.18.0.9 timeout 0 && "
              "iptables -A INPUT -m set --match-set cwm-probe src -m physdev --physdev-is-bridged "
              "-j RETURN")
    done = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True)
    if done.returncode:
        words = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        return [f"ipset or iptables' set/physdev match do not work here ({words}): kube-router's "
                "firewall needs CONFIG_IP_SET, xt_set and xt_physdev"]
    return []


def argv(binary_path: Path, kubeconfig: Path, node_name: str, service_range: str,
         health_port: int) -> list[str]:
    """The firewall alone: no router (BGP, routes, CNI), no service proxy, no metrics."""
    return [str(binary_path), f"--kubeconfig={kubeconfig}", f"--hostname-override={node_name}",
            "--run-firewall=true", "--run-router=false", "--run-service-proxy=false",
            "--run-loadbalancer=false", "--enable-cni=false", "--enable-ipv6=false",
            f"--service-cluster-ip-range={service_range}", f"--health-port={health_port}",
            "--metrics-port=0", "--iptables-sync-period=1m", "-v=1"]


def synced() -> bool:
    """True once its chains are in place (its first full sync ran)."""
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    return f"-j {FORWARD_CHAIN}" in rules


def pod_chains() -> list[str]:
    """The per-pod firewall chains kube-router keeps (one for each local pod it guards)."""
    rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
    return re.findall(r"^-N (KUBE-POD-FW-\S+)$", rules, re.M)


def sweep() -> list[str]:
    """Destroy the ipsets kube-router left (after its chains, which reference them, are gone:
    the node's iptables sweep removes every KUBE-* chain first). Returns the names destroyed."""
    if subprocess.run(["sh", "-c", "command -v ipset"], capture_output=True).returncode:
        return []
    names = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True).stdout.split()
    ours = [n for n in names if n.startswith(IPSET_PREFIXES)]
    for name in ours:
        subprocess.run(["ipset", "destroy", name], capture_output=True)
    return ours
