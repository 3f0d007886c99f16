"""The chart's RBAC is least privilege, proven against the operator's own declaration.

`cwm_operator.permissions.RULES` is what the operator needs; its cluster scenario tests run it
with exactly those rules, so a missing grant fails there. Here: the rendered ClusterRole (all
namespaces) or every Role (listed namespaces) grants exactly the same (group, resource, verb)
triples, so the chart grants nothing beyond them; in namespaced mode nothing is cluster-wide.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from tests.chart.helm import CHART, NAMESPACE, find, one

Triple = tuple[str, str, str]


def triples(rules: Iterable[dict[str, Any]]) -> set[Triple]:
    """Every (apiGroup, resource, verb) a list of PolicyRules grants; wildcards and
    resourceNames/nonResourceURLs are refused outright (they cannot be least privilege here)."""
    out: set[Triple] = set()
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    out.add((group, resource, verb))
    return out


def operator_needs() -> set[Triple]:
    from cwm_operator.permissions import RULES

    return triples(RULES)


def test_triples_expands_and_refuses_wildcards() -> None:
    rules = [{"apiGroups": ["", "batch"], "resources": ["jobs"], "verbs": ["get", "list"]}]
    assert triples(rules) == {("", "jobs", "get"), ("", "jobs", "list"),
                              ("batch", "jobs", "get"), ("batch", "jobs", "list")}
    with pytest.raises(AssertionError):
        triples([{"apiGroups": ["*"], "resources": ["jobs"], "verbs": ["get"]}])


def test_all_namespaces_cluster_role_equals_the_operator_rules(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["default"]
    role = one(objects, "ClusterRole")
    assert triples(role["rules"]) == operator_needs()
    assert not find(objects, "Role") and not find(objects, "RoleBinding")
    binding = one(objects, "ClusterRoleBinding")
    sa = one(objects, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_listed_namespaces_get_roles_and_nothing_cluster_wide(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["namespaced-values.yaml"]
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    roles = find(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["research", "team-b"]
    for role in roles:
        assert triples(role["rules"]) == operator_needs()
        ns = role["metadata"]["namespace"]
        binding = one(objects, "RoleBinding", namespace=ns)
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cwm-operator-sa",
                                        "namespace": NAMESPACE}]


def test_rbac_create_false_renders_no_rbac(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["minimal-values.yaml"]
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert not find(objects, kind)


@pytest.mark.parametrize("case", ["default", "gpu-values.yaml", "local-values.yaml",
                                  "namespaced-values.yaml"])
def test_every_rendered_grant_is_needed(rendered: dict[str, list[dict[str, Any]]],
                                        case: str) -> None:
    """Across every values file, the union of all granted triples is the operator's needs."""
    granted: set[Triple] = set()
    for obj in rendered[case]:
        if obj["kind"] in ("ClusterRole", "Role"):
            granted |= triples(obj["rules"])
    assert granted == operator_needs()


def test_rules_are_written_once_in_the_chart() -> None:
    """One helper holds the rules; rbac.yaml includes it for both scopes."""
    rbac = (CHART / "templates" / "rbac.yaml").read_text()
    assert rbac.count('include "cwm-operator.rules"') == 2
    assert "verbs:" not in rbac
