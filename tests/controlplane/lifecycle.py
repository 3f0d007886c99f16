"""Move Jobs and PyTorchJobs through their lifecycle the way their controllers do.

No kubelet runs in the API-only test control plane (the `kube` fixture), so no pod ever starts and
neither the Job controller nor the Kubeflow training operator has anything to observe. These
helpers write the status those controllers would write, in the same order and through the same
`/status` subresource with optimistic concurrency (read, change, PUT with resourceVersion, retry
on conflict). The API server
validates every write: for batch/v1 Jobs it enforces the controller's own invariants (a Failed
Job carries FailureTarget first, a Complete one SuccessCriteriaMet and a completionTime, a finished
Job has no active pods), so a helper that drifts from the real sequence fails loudly.

Status building is pure (functions of the current object and a timestamp); only `_update_status`
talks to the API server.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]

PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs")
_CONFLICT_RETRIES = 10


def now() -> str:
    """RFC 3339 UTC timestamp with second precision, as Kubernetes serialises metav1.Time."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----- batch/v1 Job: the Job controller's status writes -------------------------------------

def _job_condition(type_: str, reason: str, message: str, at: str) -> Obj:
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": at, "lastTransitionTime": at}


def _with_condition(conditions: list[Obj] | None, condition: Obj) -> list[Obj]:
    kept = [c for c in conditions or [] if c.get("type") != condition["type"]]
    return [*kept, condition]


def job_started(job: Obj, at: str) -> Obj:
    """Status once the controller has created the pods: startTime set, `parallelism` active."""
    status = dict(job.get("status") or {})
    status.setdefault("startTime", at)
    status["active"] = int(job["spec"].get("parallelism") or 1)
    status.setdefault("ready", 0)
    status.setdefault("uncountedTerminatedPods", {})
    return status


def _completed_indexes(count: int) -> str:
    return "0" if count == 1 else f"0-{count - 1}"


def job_success_criteria_met(job: Obj, at: str) -> Obj:
    """First write on success: every pod succeeded, none active, SuccessCriteriaMet added."""
    spec = job["spec"]
    status = dict(job.get("status") or {})
    status.setdefault("startTime", at)
    completions = int(spec.get("completions") or 1)
    status.update(active=0, ready=0, terminating=0, succeeded=completions, uncountedTerminatedPods={})
    if spec.get("completionMode") == "Indexed":
        status["completedIndexes"] = _completed_indexes(completions)
    message = "Reached expected number of succeeded pods"
    status["conditions"] = _with_condition(
        status.get("conditions"), _job_condition("SuccessCriteriaMet", "CompletionsReached", message, at))
    return status


def job_complete(job: Obj, at: str) -> Obj:
    """Second write on success: Complete with a completionTime (pods are gone by now)."""
    status = dict(job.get("status") or {})
    message = "Reached expected number of succeeded pods"
    status["conditions"] = _with_condition(
        status.get("conditions"), _job_condition("Complete", "CompletionsReached", message, at))
    status["completionTime"] = at
    return status


def job_failure_target(job: Obj, at: str, reason: str, message: str) -> Obj:
    """First write on failure: backoffLimit + 1 pods failed, FailureTarget added."""
    status = dict(job.get("status") or {})
    status.setdefault("startTime", at)
    backoff_limit = job["spec"].get("backoffLimit")
    failed = (6 if backoff_limit is None else int(backoff_limit)) + 1
    status.update(active=0, ready=0, terminating=0, failed=max(failed, int(status.get("failed") or 0)),
                  uncountedTerminatedPods={})
    status["conditions"] = _with_condition(
        status.get("conditions"), _job_condition("FailureTarget", reason, message, at))
    return status


def job_failed(job: Obj, at: str, reason: str, message: str) -> Obj:
    """Second write on failure: the terminal Failed condition (failed Jobs get no completionTime)."""
    status = dict(job.get("status") or {})
    status["conditions"] = _with_condition(
        status.get("conditions"), _job_condition("Failed", reason, message, at))
    return status


# ----- kubeflow.org/v1 PyTorchJob: the training operator's status writes ---------------------

def _replica_types(job: Obj) -> dict[str, int]:
    specs = job.get("spec", {}).get("pytorchReplicaSpecs") or {}
    return {rtype: int(spec.get("replicas") or 1) for rtype, spec in specs.items()}


def pytorchjob_with_condition(
    job: Obj, type_: str, status: str, reason: str | None, message: str, at: str
) -> Obj:
    """The training operator's `updateJobConditions`: returns the new status.

    Mirrors kubeflow/training-operator's setCondition/filterOutCondition: nothing changes once
    Failed; Running and Restarting replace each other; Succeeded or Failed turn Running False;
    lastTransitionTime is kept when the status of a condition does not change.
    """
    current = dict(job.get("status") or {})
    conditions: list[Obj] = [dict(c) for c in current.get("conditions") or []]
    current.setdefault("replicaStatuses", {rtype: {} for rtype in _replica_types(job)})
    if any(c["type"] == "Failed" and c["status"] == "True" for c in conditions):
        current["conditions"] = conditions
        return current
    kind = job.get("kind", "PyTorchJob")
    condition = {"type": type_, "status": status, "reason": reason or f"{kind}{type_}",
                 "message": message, "lastUpdateTime": at, "lastTransitionTime": at}
    old = next((c for c in conditions if c["type"] == type_), None)
    if old is not None and old["status"] == status and old.get("reason") == condition["reason"]:
        current["conditions"] = conditions
        return current
    if old is not None and old["status"] == status:
        condition["lastTransitionTime"] = old.get("lastTransitionTime", at)
    kept = []
    for c in conditions:
        if c["type"] == type_ or {type_, c["type"]} == {"Running", "Restarting"}:
            continue
        if type_ in ("Succeeded", "Failed") and c["type"] == "Running":
            c = {**c, "status": "False"}
        kept.append(c)
    current["conditions"] = [*kept, condition]
    current["lastReconcileTime"] = at
    return current


def pytorchjob_created(job: Obj, at: str) -> Obj:
    ident = f"{job['metadata'].get('namespace', 'default')}/{job['metadata']['name']}"
    return pytorchjob_with_condition(job, "Created", "True", None, f"PyTorchJob {ident} is created.", at)


def pytorchjob_running(job: Obj, at: str) -> Obj:
    job = {**job, "status": pytorchjob_created(job, at)}
    ident = f"{job['metadata'].get('namespace', 'default')}/{job['metadata']['name']}"
    status = pytorchjob_with_condition(job, "Running", "True", None, f"PyTorchJob {ident} is running.", at)
    status.setdefault("startTime", at)
    status["replicaStatuses"] = {rtype: {"active": n} for rtype, n in _replica_types(job).items()}
    return status


def pytorchjob_succeeded(job: Obj, at: str) -> Obj:
    job = {**job, "status": pytorchjob_running(job, at)}
    ident = f"{job['metadata'].get('namespace', 'default')}/{job['metadata']['name']}"
    status = pytorchjob_with_condition(
        job, "Succeeded", "True", None, f"PyTorchJob {ident} is successfully completed.", at)
    status["replicaStatuses"] = {rtype: {"succeeded": n} for rtype, n in _replica_types(job).items()}
    status["completionTime"] = at
    return status


def pytorchjob_failed(job: Obj, at: str, message: str) -> Obj:
    job = {**job, "status": pytorchjob_running(job, at)}
    status = pytorchjob_with_condition(job, "Failed", "True", None, message, at)
    replicas = _replica_types(job)
    first = next(iter(replicas), "Master")
    status["replicaStatuses"] = {rtype: ({"failed": 1, "active": n - 1} if rtype == first else {"active": 0})
                                 for rtype, n in replicas.items()}
    return status


# ----- the API writes -----------------------------------------------------------------------

def _update_status(read: Callable[[], Obj], write: Callable[[Obj], Any], change: Callable[[Obj], Obj]) -> Obj:
    """Read-modify-write of `.status` with resourceVersion, retried on 409 like a controller."""
    from kubernetes.client.rest import ApiException

    for attempt in range(_CONFLICT_RETRIES):
        obj = read()
        obj["status"] = change(obj)
        try:
            return write(obj)
        except ApiException as e:
            if e.status != 409 or attempt == _CONFLICT_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _job_io(api_client: Any, name: str, namespace: str) -> tuple[Callable[[], Obj], Callable[[Obj], Obj]]:
    from kubernetes import client

    batch = client.BatchV1Api(api_client)

    def read() -> Obj:
        return api_client.sanitize_for_serialization(batch.read_namespaced_job(name, namespace))

    def write(obj: Obj) -> Obj:
        return api_client.sanitize_for_serialization(batch.replace_namespaced_job_status(name, namespace, obj))

    return read, write


def _pytorchjob_io(api_client: Any, name: str, namespace: str) -> tuple[Callable[[], Obj], Callable[[Obj], Obj]]:
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)
    group, version, plural = PYTORCHJOB

    def read() -> Obj:
        return custom.get_namespaced_custom_object(group, version, namespace, plural, name)

    def write(obj: Obj) -> Obj:
        return custom.replace_namespaced_custom_object_status(group, version, namespace, plural, name, obj)

    return read, write


def start_job(api_client: Any, name: str, namespace: str) -> Obj:
    """The Job has active pods (startTime, `active`), as right after the controller created them."""
    return _update_status(*_job_io(api_client, name, namespace), lambda j: job_started(j, now()))


def complete_job(api_client: Any, name: str, namespace: str) -> Obj:
    """All pods succeeded: SuccessCriteriaMet, then Complete with completionTime (two writes)."""
    read, write = _job_io(api_client, name, namespace)
    _update_status(read, write, lambda j: job_success_criteria_met(j, now()))
    return _update_status(read, write, lambda j: job_complete(j, now()))


def fail_job(api_client: Any, name: str, namespace: str, reason: str = "BackoffLimitExceeded",
             message: str = "Job has reached the specified backoff limit") -> Obj:
    """Pods failed past backoffLimit: FailureTarget, then Failed (two writes)."""
    read, write = _job_io(api_client, name, namespace)
    _update_status(read, write, lambda j: job_failure_target(j, now(), reason, message))
    return _update_status(read, write, lambda j: job_failed(j, now(), reason, message))


def set_pytorchjob_condition(api_client: Any, name: str, namespace: str, type_: str, status: str = "True",
                             reason: str | None = None, message: str = "") -> Obj:
    """Set one condition with the training operator's rules (see `pytorchjob_with_condition`)."""
    return _update_status(*_pytorchjob_io(api_client, name, namespace),
                          lambda j: pytorchjob_with_condition(j, type_, status, reason, message, now()))


def start_pytorchjob(api_client: Any, name: str, namespace: str) -> Obj:
    """Created and Running, every replica active."""
    return _update_status(*_pytorchjob_io(api_client, name, namespace), lambda j: pytorchjob_running(j, now()))


def complete_pytorchjob(api_client: Any, name: str, namespace: str) -> Obj:
    """Succeeded (Running turned False), every replica succeeded, completionTime set."""
    return _update_status(*_pytorchjob_io(api_client, name, namespace), lambda j: pytorchjob_succeeded(j, now()))


def fail_pytorchjob(api_client: Any, name: str, namespace: str, message: str = "pytorch worker failed") -> Obj:
    """Failed (terminal: later conditions are ignored, as in the training operator)."""
    return _update_status(*_pytorchjob_io(api_client, name, namespace),
                          lambda j: pytorchjob_failed(j, now(), message))
