"""The chart's NetworkPolicies hold on the test node (kube-router's firewall enforces them).

Every target is a real pod behind a ClusterIP Service inside the cluster, and each blocked
connection has a control: a pod the policies do not select reaches the same Service, and the
sandboxed pod itself reaches it once the deny-all policy is deleted. So "blocked" is the policy,
not an address that leads nowhere.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.controlplane.cluster import Kube
from tests.controlplane.node import KUBERNETES_SERVICE_IP as API
from tests.netpol import netcheck
from tests.node import pods

pytestmark = [pytest.mark.cluster, pytest.mark.node]

SANDBOX = {"cwm.dev/network": "sandbox"}            # the data steps that run untrusted programs
STORAGE = {"cwm.dev/network": "sandbox", "cwm.dev/egress": "storage"}  # the same, remote artifacts
OPEN = {"cwm.dev/network": "job"}                   # corpus, tokenizer: no policy selects them
TRAINER = {"cwm.dev/network": "trainer"}            # training stages: each other and DNS


@pytest.fixture
def ns(kube_node: Kube, node_namespace: str) -> str:
    pods.restrict(node_namespace, kube_node)
    return node_namespace


def _until(check, timeout: float = 30) -> bool:
    """Poll `check` (the agent applies a changed policy within seconds, not at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(1)
    return False


def test_deny_all_blocks_a_cluster_service_that_an_unselected_pod_reaches(
        kube_node: Kube, ns: str) -> None:
    target, store = uuid.uuid4().hex, uuid.uuid4().hex
    pods.create(kube_node, ns, *netcheck.server("target", target), *netcheck.server("store", store),
                netcheck.probe_pod("open", OPEN), netcheck.probe_pod("sandbox", SANDBOX),
                netcheck.probe_pod("storage", STORAGE), netcheck.probe_pod("trainer-a", TRAINER),
                netcheck.probe_pod("trainer-b", TRAINER))
    netcheck.ready(kube_node, ns, "target", "store", "open", "sandbox", "storage", "trainer-a",
                   "trainer-b")
    # The object store's address is known only now: the allow-list names it as users would
    # (an ipBlock and a port), and the pod reaches it through its Service and DNS name.
    egress = [{"to": [{"ipBlock": {"cidr": f"{netcheck.pod_ip(kube_node, ns, 'store')}/32"}}],
               "ports": [{"port": netcheck.PORT, "protocol": "TCP"}]}]
    pods.create(kube_node, ns, *netcheck.chart_policies(kube_node, ns, egress))
    waited = {p: netcheck.wait_guarded(kube_node, ns, p)
              for p in ("sandbox", "storage", "trainer-a", "trainer-b")}
    target_ip = netcheck.service_ip(kube_node, ns, "target")
    store_name = f"store.{ns}.svc.cluster.local"

    # The controls: the Service answers, through its ClusterIP and through cluster DNS.
    assert netcheck.connect(kube_node, ns, "open", target_ip) == target, \
        pods.describe(kube_node, ns)
    assert netcheck.connect(kube_node, ns, "open", f"target.{ns}.svc.cluster.local") == target
    assert netcheck.resolve(kube_node, ns, "open", f"store.{ns}.svc.cluster.local")
    sandbox_ip = netcheck.pod_ip(kube_node, ns, "sandbox")
    tried = {
        "sandbox -> target Service": ("sandbox", target_ip, netcheck.PORT),
        "sandbox -> API Service": ("sandbox", API, 443),
        "storage -> store by name": ("storage", store_name, netcheck.PORT),
        "storage -> target Service": ("storage", target_ip, netcheck.PORT),
        "storage -> API Service": ("storage", API, 443),
        "open -> sandbox pod (ingress)": ("open", sandbox_ip, netcheck.PORT),
        "trainer-a -> trainer-b": ("trainer-a", netcheck.pod_ip(kube_node, ns, "trainer-b"),
                                   netcheck.PORT),
        "trainer-a -> target Service": ("trainer-a", target_ip, netcheck.PORT),
        "trainer-a -> API Service": ("trainer-a", API, 443),
        "open -> trainer-a (ingress)": ("open", netcheck.pod_ip(kube_node, ns, "trainer-a"),
                                        netcheck.PORT),
    }
    seen = {what: netcheck.attempt(kube_node, ns, *how) for what, how in tried.items()}
    dns = netcheck.resolve(kube_node, ns, "sandbox", store_name)
    trainer_dns = netcheck.resolve(kube_node, ns, "trainer-a", store_name)
    print(f"\nseconds until the agent guarded each pod: {waited}\nsandbox -> DNS: {dns}\n"
          f"trainer-a -> DNS: {trainer_dns}\n" +
          "\n".join(f"  {k}: {v!r}" for k, v in seen.items()))
    assert not dns, "the sandboxed pod resolved a name through cluster DNS"
    assert trainer_dns, "a training pod could not resolve a name through cluster DNS"
    assert {k: answer for k, (answer, _) in seen.items()} == {
        "sandbox -> target Service": "", "sandbox -> API Service": "",
        "storage -> store by name": store,   # DNS and the allow-listed store: allowed
        "storage -> target Service": "", "storage -> API Service": "",
        "open -> sandbox pod (ingress)": "",
        "trainer-a -> trainer-b": "trainer-b",  # training pods reach each other (gloo, rendezvous)
        "trainer-a -> target Service": "", "trainer-a -> API Service": "",
        "open -> trainer-a (ingress)": "",
    }, pods.describe(kube_node, ns)

    # Blocked by the policy, not by routing: without it the same pods reach the same Service
    # and the sandboxed pod answers.
    deny_all = f"{netcheck.RELEASE}-cwm-operator-sandbox-deny-all"
    kube_node.kubectl("delete", "networkpolicy", "-n", ns, deny_all, check=True)
    assert _until(lambda: netcheck.connect(kube_node, ns, "sandbox", target_ip) == target), \
        "the sandboxed pod still cannot reach the Service 30 s after its policy was deleted"
    assert _until(lambda: netcheck.connect(kube_node, ns, "open", sandbox_ip) == "sandbox")
