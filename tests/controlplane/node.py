"""A real node for the test cluster: containerd, kubelet, kube-proxy, kube-scheduler and CoreDNS.

`LocalNode` turns the loopback control plane of `cluster.py` into a one-node cluster whose pods
really run. Everything comes from this machine: the Kubernetes programs and CoreDNS are built from
Go modules by build.sh; containerd, runc, the CNI plugins, iptables and conntrack are Debian's
(node-deps.sh); the pause, busybox and CoreDNS images are packed locally (nodeimages.py); the
project's images are copied from the local Docker engine when they have been built.

Choices (see README.md for the reasons): Debian's containerd 1.6.20 with its CRI plugin and runc
1.1.5, as a separate instance (own socket, root and state folders, own CNI configuration) beside
Docker's; cgroup v1 with the cgroupfs driver (`failCgroupV1: false`); a bridge CNI network on the
`cwm0` bridge with pods in 198.18.0.0/24 and Services in 198.19.0.0/24 (both inside the
benchmarking range 198.18.0.0/15), no masquerading; kube-proxy in iptables mode; CoreDNS as a pod
that answers only for cluster.local (it forwards nothing). The API server and the kubelet listen on
the bridge address 198.18.0.1 only (pods reach the API through the `kubernetes` Service), and the
API server reaches the kubelet by that InternalIP, so `kubectl logs` works without a host name.

The node is machine-wide (a bridge, iptables chains, /var/run/netns), so only one runs at a time:
`/run/cwm-node/owner.pid` names its owner. `stop()` deletes the pods, stops every process and
`sweep()` removes what is left (shims, mounts, network namespaces, iptables chains, the bridge,
cgroups); a node whose owner died is swept before the next one starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane import nodeimages
from tests.controlplane.procs import free_port
from tests.netpol import agent as netpol

log = logging.getLogger("cwm.node")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEPS_SCRIPT = HERE / "node-deps.sh"

NODE_NAME = "cwm-node"
BRIDGE = "cwm0"
NODE_IP = "198.18.0.1"
POD_SUBNET = "198.18.0.0/24"
SERVICE_RANGE = "198.19.0.0/24"
KUBERNETES_SERVICE_IP = "198.19.0.1"
DNS_SERVICE_IP = "198.19.0.10"
CLUSTER_DOMAIN = "cluster.local"

RUN_DIR = Path("/run/cwm-node")          # sockets, containerd state, CNI config and IPAM
STATE_DIR = Path("/var/lib/cwm-node")    # containerd's image store (kept: a cache), kubelet root
NETNS_DIR = Path("/var/run/netns")       # where containerd 1.6's CRI plugin pins pod netns

#: Localhost seccomp profiles the chart's pods use (the sandbox's, which lets bubblewrap make its
#: namespaces); a cluster operator installs them on each node, we copy them into the kubelet's root.
SECCOMP_PROFILES = tuple(p for p in [REPO / "charts" / "cwm-operator" / "files" / "cwm-sandbox.json"] if p.is_file())

PAUSE_IMAGE = "cwm.local/pause:1"
BUSYBOX_IMAGE = "cwm.local/busybox:1"
COREDNS_IMAGE_REPO = "cwm.local/coredns"
#: The project's images, as the chart names them by default (tag: the chart's appVersion).
PROJECT_IMAGES = ("cwm-operator", "cwm-beam", "cwm-trainer")
PROJECT_REGISTRY = "ghcr.io/cwm-pipeline"


class NodeError(RuntimeError):
    """The node could not be set up or started; the message says what and how to fix it."""


def run(argv: list[str], *, check: bool = True, input: bytes | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run a host command; on failure raise NodeError with its output (never a bare exit code)."""
    done = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
    if check and done.returncode != 0:
        raise NodeError(f"`{' '.join(argv)}` failed ({done.returncode}): "
                        f"{(done.stderr or done.stdout).decode(errors='replace').strip()}")
    return done


# ----- configuration files (pure) -----------------------------------------------------------

def containerd_config(runc: str) -> str:
    """containerd 1.6's config (version 2): its own socket, root and state, the CRI plugin with
    our pause image, CNI from Debian's plugins and our conf dir. `restrict_oom_score_adj`: root
    here lacks CAP_SYS_RESOURCE, so lowering a container's oom_score_adj is refused."""
    return f"""version = 2
root = "{STATE_DIR}/containerd"
state = "{RUN_DIR}/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{RUN_DIR}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{STATE_DIR}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{RUN_DIR}/cni"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
"""


def cni_conflist() -> dict[str, Any]:
    """bridge (host-local IPAM, no masquerade, hairpin for a pod reaching itself via a Service),
    portmap (hostPort), firewall (accepts pod traffic in FORWARD: Docker's policy there is DROP)."""
    return {
        "cniVersion": "1.0.0",
        "name": "cwm-pods",
        "plugins": [
            {
                "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "rangeStart": "198.18.0.10", "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(RUN_DIR / "cni-ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "firewall", "backend": "iptables"},
        ],
    }


def kubelet_config(workdir: Path, port: int, healthz_port: int) -> dict[str, Any]:
    """The KubeletConfiguration: cgroup v1 allowed, cgroupfs, our containerd, our DNS, x509 client
    authentication from the test CA, eviction thresholds low enough not to evict test pods on a
    busy shared disk, image GC off (our images cannot be pulled back)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(workdir / "kubelet.crt"),
        "tlsPrivateKeyFile": str(workdir / "kubelet.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(workdir / "ca.crt")}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{RUN_DIR}/containerd.sock",
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(workdir / "resolv.conf"),
        "podCIDR": POD_SUBNET,
        "podLogsDir": str(STATE_DIR / "pod-logs"),
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
        "staticPodPath": "",
        "rotateCertificates": False,
        "serializeImagePulls": False,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "maxPods": 60,
    }


def kube_proxy_config(kubeconfig: Path, healthz_port: int, metrics_port: int) -> dict[str, Any]:
    """iptables mode; node ports only on the node's bridge address; conntrack sysctls untouched."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": POD_SUBNET,
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


COREFILE = f""".:1053 {{
    errors
    health :8080
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30
}}
"""


def coredns_manifests(image: str) -> list[dict[str, Any]]:
    """CoreDNS as a Deployment in kube-system behind the `kube-dns` Service at DNS_SERVICE_IP.

    It listens on 1053 (the Service maps 53 to it), so it runs as non-root with every capability
    dropped and a read-only root: it passes Pod Security "restricted". No `forward` plugin: the
    cluster's names are all it answers (nothing leaves this machine)."""
    labels = {"k8s-app": "kube-dns"}
    meta = {"namespace": "kube-system", "labels": labels}
    rules = [
        {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ]
    container = {
        "name": "coredns", "image": image, "imagePullPolicy": "IfNotPresent",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [{"name": "dns", "containerPort": 1053, "protocol": "UDP"},
                  {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"}],
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "50m", "memory": "40Mi"}, "limits": {"memory": "170Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec = {
        "serviceAccountName": "coredns", "dnsPolicy": "Default", "priorityClassName": "system-cluster-critical",
        "securityContext": {"runAsNonRoot": True, "runAsUser": nodeimages.NONROOT_UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "cwm:coredns"}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "cwm:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cwm:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", **meta},
         "data": {"Corefile": COREFILE}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "coredns", **meta},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": pod_spec}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", **meta},
         "spec": {"selector": labels, "clusterIP": DNS_SERVICE_IP,
                  "ports": [{"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"}]}},
    ]


def project_image_refs(chart: Path = REPO / "charts" / "cwm-operator" / "Chart.yaml") -> list[str]:
    """The project's image references as the chart's defaults name them."""
    version = yaml.safe_load(chart.read_text())["appVersion"]
    return [f"{PROJECT_REGISTRY}/{name}:{version}" for name in PROJECT_IMAGES]


# ----- host programs -------------------------------------------------------------------------

def sweep_if_unowned() -> list[str]:
    """`sweep()` unless a live process owns the node (then nothing is touched)."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        owner = int((RUN_DIR / "owner.pid").read_text())
        if _pid_alive(owner):
            raise NodeError(f"the test node is owned by live pid {owner}: not sweeping")
    return sweep()


def prune_image_store() -> str:
    """Delete the node's image store (the project's images in it are GBs: a second copy of what
    Docker holds); refused while a node runs. Returns what was freed, in words."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        owner = int((RUN_DIR / "owner.pid").read_text())
        if _pid_alive(owner):
            raise NodeError(f"the test node is running (owner pid {owner}): stop it before pruning its images")
    size = sum(f.stat().st_size for f in STATE_DIR.rglob("*") if f.is_file() and not f.is_symlink()) \
        if STATE_DIR.is_dir() else 0
    sweep()  # unmounts anything a killed node left under STATE_DIR first
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    return f"removed {STATE_DIR} ({size / 2**30:.1f} GiB)"


@dataclass(frozen=True)
class HostPrograms:
    """The Debian programs the node runs (installed by node-deps.sh) and the built ones."""

    containerd: str
    ctr: str
    runc: str
    busybox: Path
    pause: Path
    coredns: Path

    @classmethod
    def find(cls, cache: Path, coredns_version: str) -> HostPrograms:
        """Every program, or a NodeError naming what is missing and the command that installs it."""
        found = {name: shutil.which(name) for name in ("containerd", "ctr", "runc", "iptables", "conntrack", "ip")}
        paths = {
            "cni bridge plugin": Path("/usr/lib/cni/bridge"),
            "busybox (static)": Path("/bin/busybox"),
            "pause binary": cache / "node" / "pause" / "pause",
            "coredns": cache / "node" / f"coredns-{coredns_version}" / "coredns",
        }
        missing = [name for name, where in found.items() if where is None]
        missing += [f"{name} ({where})" for name, where in paths.items() if not where.exists()]
        if missing:
            raise NodeError(f"test node programs missing: {', '.join(missing)}. Install them with "
                            "`make node` (tests/controlplane/node-deps.sh: Debian packages and the "
                            "pause binary; tests/controlplane/build.sh: kubelet, kube-proxy, "
                            "kube-scheduler, CoreDNS)")
        return cls(found["containerd"], found["ctr"], found["runc"], paths["busybox (static)"],  # type: ignore[arg-type]
                   paths["pause binary"], paths["coredns"])


# ----- machine-wide set-up and sweep ---------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(owner_pid: int) -> None:
    """Take the machine's one node slot, sweeping a node whose owner died; refuse a live one."""
    pid_file = RUN_DIR / "owner.pid"
    with contextlib.suppress(FileNotFoundError, ValueError):
        other = int(pid_file.read_text())
        if other != owner_pid and _pid_alive(other):
            raise NodeError(f"a test node is already running on this machine (owner pid {other}, "
                            f"see {RUN_DIR}): stop it with `make cluster-down`, or point the tests at it "
                            "with CWM_TEST_KUBECONFIG")
        log.warning("sweeping a test node left by pid %s", other)
    sweep()
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(owner_pid))


def setup_network() -> None:
    """The bridge with the node's address (the API server binds it before any pod exists), IP
    forwarding and bridged traffic through iptables (kube-proxy's Service NAT between pods)."""
    if run(["ip", "link", "show", BRIDGE], check=False).returncode != 0:
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    addresses = run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE]).stdout.decode()
    if f" {NODE_IP}/" not in addresses:
        run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    changed = {}
    for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        path = Path("/proc/sys") / key
        if not path.exists():
            lacks = "br_netfilter" if "bridge" in key else "IPv4 forwarding"
            raise NodeError(f"{path} is missing: the kernel lacks {lacks}")
        if (old := path.read_text().strip()) != "1":
            changed[key] = old
            path.write_text("1")
    if changed:  # sweep() puts them back
        json_dump(RUN_DIR / "sysctl-restore.json", changed)


def _our_shims() -> list[int]:
    """containerd shims started for our containerd (their command line names our socket)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(RUN_DIR).encode() in b" ".join(argv):
            pids.append(int(proc.name))
    return pids


def _our_mounts() -> list[str]:
    """Mount points under our folders and pod network namespaces, deepest first (/var/run is a
    link to /run, and mountinfo names the target)."""
    prefixes = (str(RUN_DIR) + "/", str(STATE_DIR) + "/", str(NETNS_DIR / "cni-"), str(NETNS_DIR.resolve() / "cni-"))
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefixes):
            points.append(point)
    return sorted(set(points), key=len, reverse=True)


def _kubepods_cgroups() -> list[Path]:
    """The kubelet's `kubepods` cgroup trees in every hierarchy (v1 controllers, or v2)."""
    root = Path("/sys/fs/cgroup")
    tops = [root / "kubepods", *(h / "kubepods" for h in root.iterdir() if h.is_dir())] if root.is_dir() else []
    return [t for t in tops if t.is_dir()]


def _kill_pod_processes(timeout: float = 10) -> list[int]:
    """SIGKILL every process in the kubepods cgroups: the containers of a node whose kubelet and
    shims died (a killed shim leaves its container running, reparented to init)."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = set()
        for top in _kubepods_cgroups():
            for procs in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids |= {int(p) for p in procs.read_text().split()}
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
        time.sleep(0.2)
    return sorted(killed)


def _iptables_sweep(tool: str) -> None:
    """Remove the KUBE-* and CNI-* chains (kubelet, kube-proxy, CNI plugins) and every jump to
    them; Docker's chains and rules are left alone."""
    if shutil.which(tool) is None:
        return
    for table in ("filter", "nat", "mangle"):
        rules = run([tool, "-t", table, "-S"], check=False).stdout.decode().splitlines()
        ours = {r.split()[1] for r in rules if r.startswith("-N ") and r.split()[1].startswith(("KUBE-", "CNI-"))}
        for rule in rules:
            parts = shlex.split(rule)
            if parts[0] == "-A" and parts[1] not in ours and "-j" in parts and parts[parts.index("-j") + 1] in ours:
                run([tool, "-t", table, "-D", *parts[1:]], check=False)
        for chain in ours:
            run([tool, "-t", table, "-F", chain], check=False)
        for chain in ours:
            run([tool, "-t", table, "-X", chain], check=False)


def _cgroup_sweep() -> None:
    """Remove the kubepods cgroups the kubelet made (empty once the containers are gone)."""
    for top in _kubepods_cgroups():
        for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def sweep() -> list[str]:
    """Remove everything a node leaves behind, whether it stopped cleanly or was killed: the
    containers' processes, shims, mounts, pod network namespaces, iptables chains, the bridge,
    cgroups, the sysctls it turned on, run-time state. Keeps the image store under
    STATE_DIR/containerd (a cache). Returns what it found (empty after a clean stop)."""
    found = [f"container process {pid}" for pid in _kill_pod_processes()]
    for pid in _our_shims():
        found.append(f"shim pid {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
    for point in _our_mounts():
        found.append(f"mount {point}")
        run(["umount", "-l", point], check=False)
    for netns in NETNS_DIR.glob("cni-*") if NETNS_DIR.is_dir() else ():
        found.append(f"netns {netns}")
        run(["umount", str(netns)], check=False)  # if it was still mounted (bind mount of a netns)
        with contextlib.suppress(OSError):
            netns.unlink()
    _iptables_sweep("iptables")
    _iptables_sweep("ip6tables")
    netpol.sweep()  # kube-router's ipsets, after the chains that match them (left by design)
    if run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
        run(["ip", "link", "delete", BRIDGE], check=False)
    _cgroup_sweep()
    with contextlib.suppress(FileNotFoundError):
        for key, old in json.loads((RUN_DIR / "sysctl-restore.json").read_text()).items():
            (Path("/proc/sys") / key).write_text(old)
    for link in Path("/var/log/containers").glob("*.log") if Path("/var/log/containers").is_dir() else ():
        if str(STATE_DIR) in os.readlink(link) if link.is_symlink() else False:
            link.unlink()
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    shutil.rmtree(STATE_DIR / "kubelet", ignore_errors=True)
    shutil.rmtree(STATE_DIR / "pod-logs", ignore_errors=True)
    shutil.rmtree(STATE_DIR / "volumes", ignore_errors=True)  # hostPath volumes tests made
    if found:
        log.warning("node sweep removed: %s", "; ".join(found))
    return found


def ctr(programs: HostPrograms, *args: str, input: bytes | None = None, timeout: float = 600) -> bytes:
    """`ctr` against our containerd, in the CRI plugin's `k8s.io` namespace."""
    argv = [programs.ctr, "--address", str(RUN_DIR / "containerd.sock"), "--namespace", "k8s.io", *args]
    return run(argv, input=input, timeout=timeout).stdout


def docker_layers(docker: str, ref: str) -> list[tuple[str, int]] | None:
    """(diff id, bytes) of each file-system layer of `ref`, oldest first, from `docker image
    inspect` (the diff ids) and `docker history` (the sizes; `#(nop)` rows other than COPY and ADD
    are metadata and have no layer); None when the two do not pair up."""
    ids = json.loads(run([docker, "image", "inspect", "--format", "{{json .RootFS.Layers}}", ref]).stdout)
    rows = run([docker, "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}",
                ref]).stdout.decode().splitlines()
    sizes = [int(size) for size, _, by in (r.partition("\t") for r in reversed(rows))
             if "#(nop)" not in by or re.search(r"#\(nop\)\s+(COPY|ADD)\b", by)]
    return list(zip(ids, sizes)) if len(sizes) == len(ids) else None


def new_layer_bytes(layers: list[tuple[str, int]] | None, size: int, have: set[str]) -> int:
    """Bytes of the layers containerd does not hold yet (`docker save` writes each layer
    uncompressed, so containerd stores it under its diff id): a rebuilt image shares most of its
    layers with the version already imported. Unknown layers: the whole `size`."""
    if layers is None:
        return size
    return sum(layer_size for diff_id, layer_size in layers if diff_id not in have)


def _disk_problem(ref: str, size: int, total: int | None = None) -> str:
    """Why `ref` (`size` bytes of new layers) cannot be imported, or "": containerd keeps the
    layers and their unpacked copy (about twice the size), beside Docker's copy; 10 GiB stay free."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    stat = os.statvfs(STATE_DIR)
    free = stat.f_bavail * stat.f_frsize
    needed = int(size * 2.2) + (10 << 30)  # and 10 GiB left for everything else on the machine
    if free >= needed:
        return ""
    of = f" ({size / 2**30:.1f} GiB of new layers in {total / 2**30:.1f} GiB)" if total else ""
    return (f"{ref} not loaded into the node: it needs ~{needed / 2**30:.0f} GiB free under {STATE_DIR} "
            f"(the layers and their unpacked copy{of}), {free / 2**30:.0f} GiB are free; free disk space "
            f"(e.g. `docker image prune`, or `rm -rf {STATE_DIR}/containerd` while no node runs)")


def _stream_import(programs: HostPrograms, producer: list[str], timeout: float = 1800) -> None:
    """`producer | ctr images import -`, streamed (the project's images are several GB)."""
    argv = [programs.ctr, "--address", str(RUN_DIR / "containerd.sock"), "--namespace", "k8s.io",
            "images", "import", "-"]
    with subprocess.Popen(producer, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as save:
        done = subprocess.run(argv, stdin=save.stdout, capture_output=True, timeout=timeout)
        save_err = save.stderr.read() if save.stderr else b""
    if save.returncode != 0:
        raise NodeError(f"`{' '.join(producer)}` failed ({save.returncode}): {save_err.decode(errors='replace')}")
    if done.returncode != 0:
        raise NodeError(f"ctr images import failed ({done.returncode}): {done.stderr.decode(errors='replace')}")


def json_dump(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


# ----- the node ------------------------------------------------------------------------------

class LocalNode:
    """kube-scheduler, containerd, kube-proxy, kubelet and CoreDNS beside a LocalControlPlane.

    `plane` is the control plane (cluster.LocalControlPlane, started with `with_node=True`): its
    CA signs the node's certificates, its `_component` starts (and logs) our processes, so they
    stop with it. `prepare()` runs before the control plane starts (the API server binds the
    bridge address), `start()` after it; `stop()` is safe after any failure.
    """

    def __init__(self, plane: Any, bin_folder: Path, programs: HostPrograms, coredns_version: str) -> None:
        self.plane = plane
        self.bins = bin_folder
        self.programs = programs
        self.coredns_image = f"{COREDNS_IMAGE_REPO}:{coredns_version}"
        self.workdir: Path = plane.workdir / "node"
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []  # what a reader of the summary must know (images not loaded)
        self._claimed = False

    # ----- start ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Claim the machine's node slot (sweeping a dead one), set up the bridge."""
        claim(os.getpid())
        self._claimed = True
        setup_network()
        self.workdir.mkdir(parents=True, exist_ok=True)

    def start(self, wait: Callable[[Callable[[], Any], float, str], Any], project_images: bool = False) -> None:
        """Start the node's parts in dependency order; `wait(check, timeout, what)` polls.
        `project_images`: also copy the project's images from Docker (GBs: `make cluster` does,
        the test fixture only when a test asks for them, see `load_project_images`)."""
        steps: list[tuple[str, Callable[[], None]]] = [
            ("kube-scheduler", self._start_scheduler),
            ("containerd", lambda: self._start_containerd(wait)),
            ("images", lambda: self._load_images(project_images)),
            ("kube-proxy", self._start_kube_proxy),
            ("kubelet", lambda: self._start_kubelet(wait)),
            ("netpol", lambda: self._start_netpol(wait)),
            ("coredns", lambda: self._start_coredns(wait)),
        ]
        for phase, step in steps:
            t0 = time.monotonic()
            step()
            self.timings[phase] = time.monotonic() - t0

    def _kubeconfig(self, name: str, user: str, groups: tuple[str, ...]) -> Path:
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(self.plane._user_kubeconfig(user, groups))
        return path

    def _start_scheduler(self) -> None:
        # In system:masters, like the controller manager: one test identity, no RBAC bootstrap wait.
        kubeconfig = self._kubeconfig("kube-scheduler", "system:kube-scheduler", ("system:masters",))
        self.plane._component("kube-scheduler", [
            str(self.bins / "kube-scheduler"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            "--authentication-skip-lookup=true", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
        ])

    def _start_containerd(self, wait: Callable[..., Any]) -> None:
        for folder in (RUN_DIR / "cni", STATE_DIR):
            folder.mkdir(parents=True, exist_ok=True)
        json_dump(RUN_DIR / "cni" / "10-cwm-pods.conflist", cni_conflist())
        config = self.workdir / "containerd.toml"
        config.write_text(containerd_config(self.programs.runc))
        proc = self.plane._component("containerd", [self.programs.containerd, "--config", str(config)])
        socket_path = RUN_DIR / "containerd.sock"

        def serving() -> bool:
            self.plane._expect_alive(proc)
            return socket_path.exists() and b"Server" in ctr(self.programs, "version", timeout=10)

        wait(serving, 60, "containerd to serve its socket")

    def _images_present(self) -> dict[str, str]:
        """{image name: config digest} of what our containerd holds."""
        out = ctr(self.programs, "images", "ls").decode().splitlines()[1:]
        return {line.split()[0]: line.split()[2] for line in out if line.strip()}

    def _load_images(self, project_images: bool) -> None:
        """Our three images (always; cheap when unchanged) and, if asked, the project's."""
        applets = nodeimages.busybox_applets(self.programs.busybox)
        specs = [
            nodeimages.pause_image(PAUSE_IMAGE, self.programs.pause),
            nodeimages.busybox_image(BUSYBOX_IMAGE, self.programs.busybox, applets),
            nodeimages.coredns_image(self.coredns_image, self.programs.coredns),
        ]
        folder = STATE_DIR / "image-archives"
        present = self._images_present()
        current = set()
        for spec in specs:
            path, _ = nodeimages.write_archive(spec, folder)
            marker = path.with_suffix(".imported")
            current |= {path, marker}
            if spec.name in present and marker.exists():
                continue
            ctr(self.programs, "images", "import", str(path))
            marker.touch()
        for stale in [*folder.glob("*.tar"), *folder.glob("*.imported")]:
            if stale not in current:  # archives of images since rebuilt
                stale.unlink()
        if project_images:
            self.load_project_images(required=False)

    def load_project_images(self, required: bool) -> list[str]:
        """`docker save | ctr images import` for each project image the local engine has, once per
        image id (a marker file records the id imported); returns the references loaded. A
        missing one raises NodeError when `required`, else it is noted (`notes`), never faked."""
        docker = shutil.which("docker")
        present = self._images_present()
        loaded = []
        for ref in project_image_refs():
            inspect = (run([docker, "image", "inspect", "--format", "{{.Id}} {{.Size}}", ref], check=False)
                       if docker else None)
            if inspect is None or inspect.returncode != 0:
                why = "no docker CLI" if inspect is None else inspect.stderr.decode(errors="replace").strip()
                problem = f"{ref} not loaded into the node ({why}): build it with `make images`"
                if required:
                    raise NodeError(problem)
                self.notes.append(problem)
                log.warning(problem)
                continue
            loaded.append(ref)
            image_id, size = inspect.stdout.decode().split()
            marker = STATE_DIR / "image-archives" / f"{ref.replace('/', '_').replace(':', '_')}.id"
            previous = marker.read_text() if marker.exists() else ""
            if ref in present and previous == image_id:
                continue
            have = set(ctr(self.programs, "content", "ls", "-q").decode().split())
            problem = _disk_problem(ref, new_layer_bytes(docker_layers(docker, ref), int(size), have),
                                    int(size))
            if problem:
                if required:
                    raise NodeError(problem)
                self.notes.append(problem)
                log.warning(problem)
                continue
            t0 = time.monotonic()
            _stream_import(self.programs, [docker, "save", ref])
            log.info("loaded %s into the node in %.0f s", ref, time.monotonic() - t0)
            marker.write_text(image_id)
            if previous and previous != image_id:
                # The replaced version's own layers go with it (containerd's garbage collection).
                run([self.programs.ctr, "--address", str(RUN_DIR / "containerd.sock"), "--namespace",
                     "k8s.io", "images", "rm", previous], check=False)
        return loaded

    def _start_kube_proxy(self) -> None:
        kubeconfig = self._kubeconfig("kube-proxy", "system:kube-proxy", ("system:masters",))
        config = self.workdir / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump(kube_proxy_config(kubeconfig, free_port(), free_port())))
        self.plane._component("kube-proxy", [str(self.bins / "kube-proxy"), f"--config={config}"])

    def _start_kubelet(self, wait: Callable[..., Any]) -> None:
        ca = self.plane.ca
        (self.workdir / "ca.crt").write_bytes(ca.cert_pem)
        ca.serving([NODE_NAME], [NODE_IP]).write(self.workdir, "kubelet")
        (self.workdir / "resolv.conf").write_text("")  # pods get cluster DNS only: no host search paths
        seccomp = STATE_DIR / "kubelet" / "seccomp"
        seccomp.mkdir(parents=True, exist_ok=True)
        for profile in SECCOMP_PROFILES:  # what the chart's pods name as Localhost profiles
            shutil.copyfile(profile, seccomp / profile.name)
        kubeconfig = self._kubeconfig("kubelet", f"system:node:{NODE_NAME}", ("system:nodes",))
        config = self.workdir / "kubelet.yaml"
        config.write_text(yaml.safe_dump(kubelet_config(self.workdir, free_port(), free_port())))
        kubelet = self.plane._component("kubelet", [
            str(self.bins / "kubelet"), f"--config={config}", f"--kubeconfig={kubeconfig}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
            f"--root-dir={STATE_DIR / 'kubelet'}", f"--cert-dir={self.workdir / 'kubelet-pki'}",
        ])

        def ready() -> bool:
            self.plane._expect_alive(kubelet)
            node = json.loads(self._kubectl("get", "node", NODE_NAME, "-o", "json"))
            conditions = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
            taints = [t["key"] for t in node["spec"].get("taints", [])]
            return conditions.get("Ready") == "True" and not taints

        wait(ready, 120, f"node {NODE_NAME} to be Ready without taints")

    def _start_netpol(self, wait: Callable[..., Any]) -> None:
        """kube-router's firewall (tests/netpol): enforces NetworkPolicy, which the bridge CNI
        does not. After the kubelet (it looks up its Node), before any pod of ours."""
        problems = netpol.host_problems()
        if problems:
            raise NodeError("the NetworkPolicy agent cannot run here: " + "; ".join(problems))
        kubeconfig = self._kubeconfig("kube-router", "system:kube-router", ("system:masters",))
        agent = self.plane._component(netpol.NAME, netpol.argv(
            netpol.binary(), kubeconfig, NODE_NAME, SERVICE_RANGE, free_port()))

        def synced() -> bool:
            self.plane._expect_alive(agent)
            return netpol.synced()

        wait(synced, 60, "kube-router's NetworkPolicy chains")

    def _start_coredns(self, wait: Callable[..., Any]) -> None:
        docs = coredns_manifests(self.coredns_image)
        self._kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))

        def available() -> bool:
            dep = json.loads(self._kubectl("get", "deployment", "coredns", "-n", "kube-system", "-o", "json"))
            return int(dep.get("status", {}).get("availableReplicas") or 0) >= 1

        wait(available, 120, "CoreDNS to be available")

    def _kubectl(self, *args: str, input: str | None = None) -> str:
        argv = [str(self.plane.bins.kubectl), f"--kubeconfig={self.plane.kubeconfig}", *args]
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    # ----- stop ----------------------------------------------------------------------------
    def drain(self, timeout: float = 30) -> None:
        """Delete every pod and wait for the kubelet to stop them (CNI teardown, unmounts).
        Called before the controllers stop would recreate nothing: they are stopped first."""
        for name in ("kube-controller-manager", "kube-scheduler"):
            for c in self.plane.components:
                if c.name == name:
                    c.stop()
        with contextlib.suppress(Exception):
            self._kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--wait=false")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not json.loads(self._kubectl("get", "pods", "-A", "-o", "json"))["items"]:
                    return
            except Exception:  # noqa: BLE001 - the API is going away; the sweep cleans up
                return
            time.sleep(0.5)
        log.warning("pods still present after %.0f s: the sweep removes their containers", timeout)

    def stop(self) -> None:
        """Drain, stop the node's processes, remove containers, sweep the machine-wide state."""
        if not self._claimed:
            return
        names = ("kubelet", "kube-proxy", netpol.NAME, "kube-scheduler")
        running = {c.name: c for c in self.plane.components}
        if "kubelet" in running and running["kubelet"].alive():
            with contextlib.suppress(Exception):
                self.drain()
        for name in names:
            if name in running:
                running[name].stop()
        if "containerd" in running and running["containerd"].alive():
            with contextlib.suppress(Exception):
                self._remove_containers()
            running["containerd"].stop(grace=10)
        if (self.bins / "kube-proxy").exists():
            run([str(self.bins / "kube-proxy"), "--cleanup"], check=False)
        kubelet_root = STATE_DIR / "kubelet"
        if os.path.ismount(kubelet_root):  # the kubelet bind-mounts its root (shared propagation)
            run(["umount", str(kubelet_root)], check=False)
        sweep()
        with contextlib.suppress(FileNotFoundError):
            (RUN_DIR / "owner.pid").unlink()
        self._claimed = False

    def _remove_containers(self) -> None:
        """Kill and delete every task and container of ours (pods that outlived the drain)."""
        for task in ctr(self.programs, "tasks", "ls", "-q", timeout=30).decode().split():
            run([self.programs.ctr, "--address", str(RUN_DIR / "containerd.sock"), "-n", "k8s.io",
                 "tasks", "kill", "-s", "SIGKILL", task], check=False, timeout=30)
            run([self.programs.ctr, "--address", str(RUN_DIR / "containerd.sock"), "-n", "k8s.io",
                 "tasks", "delete", "-f", task], check=False, timeout=30)
        for container in ctr(self.programs, "containers", "ls", "-q", timeout=30).decode().split():
            run([self.programs.ctr, "--address", str(RUN_DIR / "containerd.sock"), "-n", "k8s.io",
                 "containers", "delete", container], check=False, timeout=30)
