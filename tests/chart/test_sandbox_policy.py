"""What the chart ships for the sandbox: the step pods' NetworkPolicies and the Localhost seccomp
profile, checked against the labels and security contexts cwm_operator.render gives the pods.

Enforcement itself (a policy blocking a connection, bubblewrap starting in a pod) needs a node
with an enforcing network plugin and the profile installed: that is the node-backed suite's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from cwm_operator.render import render_child
from cwm_operator.settings import Settings
from cwm_spec.plan import Target, build_plan
from cwm_spec.validation import parse_pipeline
from tests.chart.helm import CHART, REPO, Helm, container_env, find, one

PROFILE = CHART / "files" / "cwm-sandbox.json"
#: What bubblewrap calls to build its sandbox: the profile must let them through.
BWRAP_NEEDS = {"clone", "clone3", "unshare", "setns", "mount", "umount2", "pivot_root", "prctl",
               "capset", "sethostname"}
#: Kernel surface RuntimeDefault refuses that a program can reach without capabilities.
MUST_DENY = {"keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
             "io_uring_setup", "ptrace", "process_vm_readv", "open_by_handle_at", "kexec_load",
             "init_module", "finit_module"}


def policies(helm: Helm, *sets: str) -> list[dict[str, Any]]:
    return find(helm.render(set_values=sets), "NetworkPolicy")


def selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(k) == v for k, v in wanted.items())


def test_policies_go_where_pipelines_run(helm: Helm) -> None:
    assert policies(helm) == []  # every namespace watched, none listed: NOTES.txt warns
    by_watch = policies(helm, "watch.namespaces={research,cwm-local}")
    assert {p["metadata"]["namespace"] for p in by_watch} == {"research", "cwm-local"}
    assert len(by_watch) == 6
    listed = policies(helm, "networkPolicy.namespaces={team-a}")
    assert {p["metadata"]["namespace"] for p in listed} == {"team-a"}
    assert policies(helm, "networkPolicy.enabled=false", "watch.namespaces={research}") == []


def test_sandbox_pods_get_no_network_and_storage_pods_an_allow_list(helm: Helm) -> None:
    storage_rule = {"to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    objects = helm.render(set_values=("watch.namespaces={research}",
                                      "networkPolicy.storageEgress[0].to[0].ipBlock.cidr=203.0.113.10/32",
                                      "networkPolicy.storageEgress[0].ports[0].port=443",
                                      "networkPolicy.storageEgress[0].ports[0].protocol=TCP"))
    deny = one(objects, "NetworkPolicy", "cwm-cwm-operator-sandbox-deny-all")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    egress = one(objects, "NetworkPolicy", "cwm-cwm-operator-storage-egress")["spec"]["egress"]
    assert [r["ports"][0]["port"] for r in egress] == [53, 443]
    assert egress[1] == storage_rule
    trainer = one(objects, "NetworkPolicy", "cwm-cwm-operator-trainer-peers")["spec"]
    assert trainer["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"cwm.dev/network": "trainer"}}}]}]


def _rendered_pods(example: str) -> list[tuple[str, dict[str, Any]]]:
    doc = next(d for d in yaml.safe_load_all((REPO / "examples" / example).read_text())
               if d.get("kind") == "CWMPipeline")
    pipeline = parse_pipeline(doc, target="cluster")
    plan = build_plan(pipeline, Target.cluster(pipeline, "research"))
    out = []
    for step in plan.steps:
        obj = render_child(pipeline, "research", step, 1, Settings())
        templates = ([r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
                     if obj["kind"] == "PyTorchJob" else [obj["spec"]["template"]])
        out += [(step.name, t) for t in templates]
    return out


def test_every_pod_that_runs_programs_is_selected_as_the_docs_say(helm: Helm) -> None:
    """examples/cluster.yaml (object storage) and local-cluster.yaml (a PVC): which policies
    select each rendered pod."""
    rendered = policies(helm, "watch.namespaces={research}")
    expected = {
        "cluster.yaml": {"traces": {"sandbox-deny-all", "storage-egress"},
                         "trajectories": {"sandbox-deny-all", "storage-egress"},
                         "tokenizer": {"storage-egress"},
                         "pretrain": {"trainer-peers", "storage-egress"}},
        "local-cluster.yaml": {"traces": {"sandbox-deny-all"}, "trajectories": {"sandbox-deny-all"},
                               "corpus": set(), "tokenizer": set(), "rl": {"trainer-peers"}},
    }
    for example, wanted in expected.items():
        for step, template in _rendered_pods(example):
            if step not in wanted:
                continue
            got = {p["metadata"]["name"].removeprefix("cwm-cwm-operator-") for p in rendered
                   if selects(p, template["metadata"]["labels"])}
            assert got == wanted[step], (example, step)


def test_seccomp_profile_lets_bubblewrap_work_and_refuses_the_rest() -> None:
    profile = json.loads(PROFILE.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ERRNO" for n in rule["names"]}
    assert MUST_DENY <= denied
    assert not BWRAP_NEEDS & denied
    assert all(rule.get("errnoRet") == 1 and not rule.get("args") for rule in profile["syscalls"])


def test_the_profile_ships_in_a_configmap_only_in_bwrap_mode(helm: Helm) -> None:
    (configmap,) = find(helm.render(), "ConfigMap", "cwm-cwm-operator-seccomp")
    assert json.loads(configmap["data"]["cwm-sandbox.json"]) == json.loads(PROFILE.read_text())
    assert find(helm.render(set_values=("children.sandbox.mode=rlimits",)), "ConfigMap",
                "cwm-cwm-operator-seccomp") == []


def test_sandbox_values_reach_the_operator(helm: Helm) -> None:
    objects = helm.render(set_values=("children.sandbox.mode=rlimits",
                                      "children.sandbox.seccompProfile=profiles/cwm.json"))
    env = container_env(one(objects, "Deployment"))
    settings = Settings.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    assert (settings.sandbox_mode, settings.sandbox_seccomp_profile) == ("rlimits", "profiles/cwm.json")
    bad = helm.template(set_values=("children.sandbox.mode=none",), check=False)
    assert bad.returncode != 0 and "/children/sandbox/mode" in bad.stderr


def test_profile_file_is_the_one_documented(helm: Helm) -> None:
    readme = (CHART / "README.md").read_text()
    assert "files/cwm-sandbox.json" in readme and "RuntimeClass" in readme
    assert Path(PROFILE).is_file()
