"""The exact RBAC rules the operator needs, and nothing more.

The Helm chart renders its ClusterRole from these (a chart test compares them), and the cluster
scenario tests run the operator as a ServiceAccount bound to exactly these rules, so a missing
verb fails a test rather than a production rollout.

Why each rule exists:

- cwmpipelines: list + watch (kopf's watch stream; the operator never GETs or updates them).
- cwmpipelines/status: patch (all progress is written to the status subresource).
- cwmpipelines/finalizers: update: children carry ``blockOwnerDeletion: true`` (``kopf.adopt``),
  which clusters with the OwnerReferencesPermissionEnforcement admission plugin only allow to
  someone who may update the owner's finalizers. The operator adds no finalizer itself.
- jobs, pytorchjobs: list + watch (progress is event-driven), get (confirm a child missing
  from a lagging watch, or one that answered 409 on create), create, patch (suspend/resume).
  No delete: the garbage collector deletes children with their pipeline.
- pods: list (best effort: a stage's master pod may leave its metrics as a termination message,
  and a failed child's pods their log tail, kept by the kubelet, FallbackToLogsOnError).
- events: create (``kubectl describe cwmpipeline`` tells the story).
"""

from __future__ import annotations

from typing import Any

RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": ["cwm.dev"], "resources": ["cwmpipelines"], "verbs": ["list", "watch"]},
    {"apiGroups": ["cwm.dev"], "resources": ["cwmpipelines/status"], "verbs": ["patch"]},
    {"apiGroups": ["cwm.dev"], "resources": ["cwmpipelines/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"],
     "verbs": ["create", "get", "list", "patch", "watch"]},
    {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"],
     "verbs": ["create", "get", "list", "patch", "watch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
)


def cluster_role(name: str = "cwm-operator") -> dict[str, Any]:
    """A ClusterRole object holding exactly :data:`RULES`."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name}, "rules": [dict(rule) for rule in RULES]}
