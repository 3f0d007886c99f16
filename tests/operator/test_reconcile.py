"""The reconcile state machine, driven through every transition without a cluster."""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import replace
from typing import Any

import pytest

from cwm_operator.reconcile import (
    Child,
    children_to_confirm,
    failure_tail,
    format_time,
    observe_child,
    reconcile,
)
from cwm_operator.settings import Settings, SettingsError
from tests.controlplane import lifecycle
from tests.operator.helpers import SETTINGS, STEPS, manifest, short_manifest

T0 = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
S = SETTINGS.fast(retry_backoff_seconds=30, retry_backoff_max_seconds=300, stuck_seconds=600)


def obj(doc, status=None, generation=1):
    doc = copy.deepcopy(doc)
    doc["metadata"].update(namespace="ns", uid="uid-1", generation=generation)
    if status is not None:
        doc["status"] = status
    return doc


def kind_of(step):
    return "PyTorchJob" if step in ("pretrain", "midtrain", "sft", "rl") else "Job"


def child(pipeline, step, attempt, phase, at=T0, **kw):
    return Child(name=f"{pipeline}-{step}-{attempt}", kind=kind_of(step), step=step,
                 attempt=attempt, phase=phase, since=at, created=at,
                 finished=at if phase in ("Succeeded", "Failed") else None, **kw)


def run(o, children=(), now=T0, settings=S):
    d = reconcile(o, list(children), now, settings)
    o = copy.deepcopy(o)
    o["status"] = d.status
    return d, o


def cond(status, type_):
    return next((c for c in status["conditions"] if c["type"] == type_), None)


DOC = manifest("p", "file:///store")


def test_a_new_pipeline_starts_its_first_step() -> None:
    d, _ = run(obj(DOC))
    assert [(c.step.name, c.attempt) for c in d.create] == [("traces", 1)]
    assert d.changed and d.status["phase"] == "Running" and d.status["currentStep"] == "traces"
    assert d.status["progress"] == "0/8"
    assert cond(d.status, "Accepted")["status"] == "True"
    assert cond(d.status, "Progressing")["reason"] == "StepRunning"
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] == format_time(T0)
               for c in d.status["conditions"])
    assert [e.reason for e in d.events] == ["StepStarted"]


def test_the_whole_pipeline_reaches_a_fixed_point() -> None:
    o, children, now = obj(DOC), [], T0
    for _i, step in enumerate(STEPS):
        d, o = run(o, children, now)
        assert [c.step.name for c in d.create] == [step]
        children.append(child("p", step, 1, "Running", now))
        now += dt.timedelta(seconds=10)
        d, o = run(o, children, now)
        assert not d.create and not d.changed and not d.events  # nothing new: no patch
        children[-1] = child("p", step, 1, "Succeeded", now,
                             metrics={"loss": 2.0} if step == "rl" else {})
    d, o = run(o, children, now)
    assert d.status["phase"] == "Succeeded" and "currentStep" not in d.status
    assert [e.reason for e in d.events] == ["StepSucceeded", "PipelineSucceeded"]
    assert d.durations == [("rl", 10.0)]
    assert d.status["steps"][-1]["metrics"] == {"loss": 2.0}
    assert cond(d.status, "Succeeded")["status"] == "True"
    d, _ = run(o, children, now + dt.timedelta(hours=1))
    assert not d.changed and not d.create and not d.events and d.requeue_after is None


def test_a_success_immediately_creates_the_next_child() -> None:
    d, o = run(obj(DOC))
    d, o = run(o, [child("p", "traces", 1, "Succeeded")])
    assert [(c.step.name, c.attempt) for c in d.create] == [("trajectories", 1)]
    assert [e.reason for e in d.events] == ["StepSucceeded", "StepStarted"]
    assert d.status["progress"] == "1/8"


def test_a_child_created_before_a_crash_is_adopted_not_duplicated() -> None:
    # Status never recorded the creation (the operator died right after creating it).
    d, o = run(obj(DOC), [child("p", "traces", 1, "Running")])
    assert not d.create
    rec = d.status["steps"][0]
    assert rec["attempts"] == 1 and rec["child"] == "p-traces-1" and rec["state"] == "Running"
    # Same for a retry whose creation was not recorded.
    d, o = run(o, [child("p", "traces", 1, "Failed")], T0 + dt.timedelta(minutes=5))
    assert [c.attempt for c in d.create] == [2]
    stale = copy.deepcopy(o)
    stale["status"]["steps"][0].update(attempts=1, child="p-traces-1", state="Running")
    d, _ = run(stale, [child("p", "traces", 1, "Failed"), child("p", "traces", 2, "Running")],
               T0 + dt.timedelta(minutes=5))
    assert not d.create and d.status["steps"][0]["attempts"] == 2


def test_failure_waits_for_the_backoff_then_retries() -> None:
    _, o = run(obj(DOC))
    failed = child("p", "traces", 1, "Failed", message="BackoffLimitExceeded: oom")
    d, o = run(o, [failed], T0 + dt.timedelta(seconds=1))
    assert not d.create and d.requeue_after == pytest.approx(29.0)
    assert cond(d.status, "Progressing")["reason"] == "RetryBackoff"
    rec = d.status["steps"][0]
    assert rec["state"] == "Pending" and "oom" in rec["message"]
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "StepFailed")]
    d, o = run(o, [failed], T0 + dt.timedelta(seconds=15))
    assert not d.create and not d.events  # announced once
    d, o = run(o, [failed], T0 + dt.timedelta(seconds=30))
    assert [(c.step.name, c.attempt) for c in d.create] == [("traces", 2)]
    # The second failure waits twice as long.
    second = child("p", "traces", 2, "Failed", T0 + dt.timedelta(seconds=40))
    d, o = run(o, [failed, second], T0 + dt.timedelta(seconds=41))
    assert d.requeue_after == pytest.approx(59.0)


def test_exhausted_retries_fail_the_pipeline_with_the_reason() -> None:
    doc = short_manifest("p", "file:///s", stages=[{"name": "pretrain", "retries": 0}])
    _, o = run(obj(doc))
    d, o = run(o, [child("p", "tokenizer", 1, "Succeeded")])
    d, o = run(o, [child("p", "tokenizer", 1, "Succeeded"),
                   child("p", "pretrain", 1, "Failed", message="NCCL timeout")])
    assert not d.create and d.status["phase"] == "Failed"
    failed = cond(d.status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "StepFailed"
    assert "pretrain" in failed["message"] and "NCCL timeout" in failed["message"]
    assert [e.reason for e in d.events] == ["StepFailed", "PipelineFailed"]
    d, _ = run(o, [child("p", "tokenizer", 1, "Succeeded"),
                   child("p", "pretrain", 1, "Failed", message="NCCL timeout")],
               T0 + dt.timedelta(hours=1))
    assert not d.changed and not d.events and not d.create


def test_a_deleted_child_counts_as_a_failed_attempt() -> None:
    _, o = run(obj(DOC))
    d, _ = run(o, [], T0 + dt.timedelta(seconds=1))
    assert "was deleted" in d.status["steps"][0]["message"]


def test_suspend_and_resume() -> None:
    _, o = run(obj(DOC))
    running = child("p", "traces", 1, "Running")
    o["spec"]["suspend"] = True
    d, o = run(o, [running])
    assert [(s.child.name, s.suspend) for s in d.suspend] == [("p-traces-1", True)]
    assert d.status["phase"] == "Suspended" and cond(d.status, "Suspended")["status"] == "True"
    assert [e.reason for e in d.events] == ["Suspended"]
    suspended = child("p", "traces", 1, "Suspended", suspended=True, suspended_by_operator=True)
    d, o = run(o, [suspended])
    assert not d.suspend and not d.events and d.status["steps"][0]["state"] == "Suspended"
    o["spec"]["suspend"] = False
    d, o = run(o, [suspended])
    assert [(s.child.name, s.suspend) for s in d.suspend] == [("p-traces-1", False)]
    assert d.status["phase"] == "Running" and [e.reason for e in d.events] == ["Resumed"]


def test_a_child_held_by_kueue_is_pending_and_never_resumed_by_the_operator() -> None:
    at = "2026-11-26T12:00:01Z"
    queued = _ptj(lambda j: lifecycle.pytorchjob_with_condition(j, "Suspended", "True", None,
                                                                "queued", at))
    queued["spec"]["runPolicy"]["suspend"] = True
    held = observe_child(queued)
    assert held.phase == "Pending" and held.suspended and not held.suspended_by_operator
    doc = short_manifest("p", "file:///s", stages=[{"name": "sft", "dataMix": {"code": 1.0}}],
                         queue="team-a")
    _, o = run(obj(doc))
    d, o = run(o, [child("p", "tokenizer", 1, "Succeeded")])
    d, _ = run(o, [child("p", "tokenizer", 1, "Succeeded"), replace(held, name="p-sft-1")])
    assert not d.suspend and d.status["steps"][-1]["state"] == "Running"
    ours = copy.deepcopy(queued)
    ours["metadata"]["annotations"]["cwm.dev/suspended"] = "true"
    assert observe_child(ours).phase == "Suspended" and observe_child(ours).suspended_by_operator


def test_a_suspended_pipeline_starts_nothing() -> None:
    doc = copy.deepcopy(DOC)
    doc["spec"]["suspend"] = True
    d, _ = run(obj(doc))
    assert not d.create and d.status["phase"] == "Suspended"


def test_an_invalid_spec_gets_a_condition_and_no_children() -> None:
    doc = copy.deepcopy(DOC)
    doc["spec"]["stages"] = [{"name": "sft"}, {"name": "pretrain"}]
    del doc["spec"]["storage"]
    d, o = run(obj(doc))
    assert not d.create and d.status["phase"] == "Failed"
    accepted = cond(d.status, "Accepted")
    assert accepted["reason"] == "InvalidSpec" and "spec.stages" in accepted["message"]
    assert [e.reason for e in d.events] == ["InvalidSpec"]
    d, _ = run(o)
    assert not d.events and not d.changed


def test_edits_to_started_steps_are_refused_until_reverted() -> None:
    _, o = run(obj(DOC))
    edited = copy.deepcopy(o)
    edited["spec"]["data"]["traces"]["seed"] = 7
    edited["metadata"]["generation"] = 2
    d, refused = run(edited, [child("p", "traces", 1, "Succeeded")])
    assert not d.create
    accepted = cond(d.status, "Accepted")
    assert accepted["reason"] == "EditRefused" and "step traces" in accepted["message"]
    assert accepted["observedGeneration"] == 2
    assert [e.reason for e in d.events] == ["EditRefused"]
    paused = copy.deepcopy(refused)
    paused["spec"]["suspend"] = True
    d, _ = run(paused, [child("p", "traces", 1, "Succeeded"), child("p", "trajectories", 1,
                                                                     "Running")])
    assert [(s.child.name, s.suspend) for s in d.suspend] == [("p-trajectories-1", True)]
    reverted = copy.deepcopy(refused)
    reverted["spec"]["data"]["traces"]["seed"] = 0
    reverted["metadata"]["generation"] = 3
    d, _ = run(reverted, [child("p", "traces", 1, "Succeeded")])
    assert [c.step.name for c in d.create] == ["trajectories"]
    assert cond(d.status, "Accepted")["status"] == "True"


def test_edits_to_later_steps_and_resources_take_effect_from_the_next_child() -> None:
    _, o = run(obj(DOC))
    edited = copy.deepcopy(o)
    edited["spec"]["stages"][2]["steps"] = 5  # sft: not started
    edited["spec"]["data"]["resources"] = {"cpu": "4", "memory": "16Gi"}  # where traces runs
    edited["spec"]["stages"] = edited["spec"]["stages"][:3]  # drop rl: not started
    d, _ = run(edited, [child("p", "traces", 1, "Succeeded")])
    assert cond(d.status, "Accepted")["status"] == "True"
    assert [c.step.name for c in d.create] == ["trajectories"]
    assert d.create[0].step.resources.cpu == "4"
    assert [s["name"] for s in d.status["steps"]] == STEPS[:-1]


def test_a_child_stuck_pending_is_reported_once() -> None:
    settings = S.fast(stuck_seconds=60)
    _, o = run(obj(DOC), settings=settings)
    pending = child("p", "traces", 1, "Pending")
    d, o = run(o, [pending], T0 + dt.timedelta(seconds=10), settings)
    assert d.requeue_after == pytest.approx(50) and cond(d.status, "Stalled") is None
    d, o = run(o, [pending], T0 + dt.timedelta(seconds=61), settings)
    stalled = cond(d.status, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ChildPending"
    assert [e.reason for e in d.events] == ["ChildStalled"]
    d, o = run(o, [pending], T0 + dt.timedelta(seconds=500), settings)
    assert not d.changed and not d.events  # a stable message: no patch churn
    d, _ = run(o, [child("p", "traces", 1, "Running")], T0 + dt.timedelta(seconds=501), settings)
    assert cond(d.status, "Stalled")["status"] == "False"


# ----- observing children through the status their controllers write -------------------------

def _job(phase_fns, **spec):
    job = {"kind": "Job", "metadata": {"name": "p-traces-2", "creationTimestamp": "2026-11-26T12:00:00Z",
                                       "labels": {"cwm.dev/step": "traces", "cwm.dev/attempt": "2"}},
           "spec": {"completions": 1, "parallelism": 1, "backoffLimit": 0, **spec}}
    for fn in phase_fns:
        job["status"] = fn(job)
    return job


def test_observing_jobs() -> None:
    at = "2026-11-26T12:00:05Z"
    c = observe_child(_job([]))
    assert (c.phase, c.step, c.attempt) == ("Pending", "traces", 2)
    assert observe_child(_job([lambda j: lifecycle.job_started(j, at)])).phase == "Running"
    done = observe_child(_job([lambda j: lifecycle.job_success_criteria_met(j, at),
                               lambda j: lifecycle.job_complete(j, at)]))
    assert done.phase == "Succeeded" and done.finished == T0 + dt.timedelta(seconds=5)
    half = observe_child(_job([lambda j: lifecycle.job_failure_target(j, at, "R", "m")]))
    assert half.phase == "Running"  # FailureTarget alone is not terminal yet
    failed = observe_child(_job([lambda j: lifecycle.job_failure_target(j, at, "R", "m"),
                                 lambda j: lifecycle.job_failed(j, at, "DeadlineExceeded", "late")]))
    assert failed.phase == "Failed" and failed.message == "DeadlineExceeded: late"
    ours = _job([], suspend=True)
    assert observe_child(ours).phase == "Pending"  # suspended, but not by the operator
    ours["metadata"]["annotations"] = {"cwm.dev/suspended": "true"}
    assert observe_child(ours).phase == "Suspended"


def _ptj(*fns):
    job = {"kind": "PyTorchJob",
           "metadata": {"name": "p-sft-1", "namespace": "ns",
                        "creationTimestamp": "2026-11-26T12:00:00Z",
                        "labels": {"cwm.dev/step": "sft", "cwm.dev/attempt": "1"},
                        "annotations": {"cwm.dev/metrics-uri": "file:///m"}},
           "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1}, "Worker": {"replicas": 3}},
                    "runPolicy": {"suspend": False}}}
    for fn in fns:
        job["status"] = fn(job)
    return job


def test_observing_pytorchjobs() -> None:
    at = "2026-11-26T12:00:07Z"
    assert observe_child(_ptj()).phase == "Pending"
    assert observe_child(_ptj(lambda j: lifecycle.pytorchjob_created(j, at))).phase == "Pending"
    assert observe_child(_ptj(lambda j: lifecycle.pytorchjob_running(j, at))).phase == "Running"
    restarting = observe_child(_ptj(lambda j: lifecycle.pytorchjob_with_condition(
        j, "Restarting", "True", None, "pod restarted", at)))
    assert restarting.phase == "Restarting" and restarting.since == T0 + dt.timedelta(seconds=7)
    done = observe_child(_ptj(lambda j: lifecycle.pytorchjob_succeeded(j, at)))
    assert done.phase == "Succeeded" and done.metrics_uri == "file:///m"
    failed = observe_child(_ptj(lambda j: lifecycle.pytorchjob_failed(j, at, "rank 3 died")))
    assert failed.phase == "Failed" and failed.message == "rank 3 died"


def test_children_to_confirm_names_the_ones_in_flight() -> None:
    d, o = run(obj(DOC), [child("p", "traces", 1, "Succeeded")])
    assert children_to_confirm(o) == [("Job", "p-trajectories-1")]


# ----- settings --------------------------------------------------------------------------------

def test_settings_from_the_environment() -> None:
    s = Settings.from_env({
        "CWM_BEAM_IMAGE": "b:1", "CWM_TRAINER_IMAGE": "t:1", "CWM_IMAGE_PULL_POLICY": "Always",
        "CWM_GPU_NODE_SELECTOR": '{"pool": "h100"}',
        "CWM_GPU_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
        "CWM_STUCK_SECONDS": "120", "CWM_RETRY_BACKOFF_SECONDS": "10",
        "CWM_RETRY_BACKOFF_MAX_SECONDS": "35", "CWM_CHILD_SERVICE_ACCOUNT": "runner",
        "CWM_CLEAN_POD_POLICY": "Running"})
    assert s.default_images == {"beam": "b:1", "trainer": "t:1"}
    assert s.gpu_node_selector == {"pool": "h100"} and s.stuck_seconds == 120
    assert [s.retry_delay(n) for n in (1, 2, 3)] == [10, 20, 35]
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize("env, field", [
    ({"CWM_IMAGE_PULL_POLICY": "Sometimes"}, "CWM_IMAGE_PULL_POLICY"),
    ({"CWM_GPU_NODE_SELECTOR": "[1]"}, "CWM_GPU_NODE_SELECTOR"),
    ({"CWM_GPU_TOLERATIONS": "{"}, "CWM_GPU_TOLERATIONS"),
    ({"CWM_STUCK_SECONDS": "soon"}, "CWM_STUCK_SECONDS"),
    ({"CWM_CLEAN_POD_POLICY": "Everything"}, "CWM_CLEAN_POD_POLICY"),
])
def test_bad_settings_name_the_variable(env, field) -> None:
    with pytest.raises(SettingsError, match=field):
        Settings.from_env(env)


def test_rbac_rules_are_minimal_and_cover_what_the_operator_calls() -> None:
    from cwm_operator.permissions import RULES, cluster_role

    allowed = {(g, r, v) for rule in RULES for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert ("cwm.dev", "cwmpipelines/status", "patch") in allowed
    assert not any(v in ("delete", "deletecollection", "*", "update") and r != "cwmpipelines/finalizers"
                   for _, r, v in allowed)
    assert not any("*" in rule["apiGroups"] or "*" in rule["resources"] for rule in RULES)
    assert cluster_role()["rules"] == [dict(r) for r in RULES]


def test_kopf_gets_the_same_credentials_as_the_kubernetes_client(tmp_path) -> None:
    import yaml as _yaml

    from cwm_operator.handlers import connection_info
    from cwm_operator.main import load_configuration

    path = tmp_path / "token.kubeconfig"
    path.write_text(_yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://10.0.0.1:6443",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "sa", "user": {"token": "abc.def"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "sa"}}]}))
    info = connection_info(load_configuration(str(path)))
    assert (info.server, info.scheme, info.token, info.insecure) == (
        "https://10.0.0.1:6443", "Bearer", "abc.def", True)


def _pod(name: str, *statuses: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"containerStatuses": list(statuses)}}


def test_a_failed_childs_log_tail_comes_from_its_failed_containers_termination_message() -> None:
    ok = {"name": "step", "state": {"terminated": {"exitCode": 0, "message": "done"}}}
    log = "\n".join(f"line {i}" for i in range(20)) + "\nModuleNotFoundError: No module named 'x'\n"
    failed = {"name": "step", "state": {"terminated": {"exitCode": 1, "reason": "Error",
                                                       "message": log}}}
    tail = failure_tail([_pod("job-1-b", ok), _pod("job-1-a", failed)])
    assert tail.startswith("pod job-1-a container step exited 1 (Error); last log lines:\n")
    shown = tail.split("last log lines:\n", 1)[1].splitlines()
    assert shown == [f"line {i}" for i in range(13, 20)] + ["ModuleNotFoundError: No module named 'x'"]
    # A rank restarted in place (OnFailure) keeps its last failure in lastState.
    restarted = {"name": "pytorch", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                 "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
    assert failure_tail([_pod("pt-master-0", restarted)]) == \
        "pod pt-master-0 container pytorch exited 137 (OOMKilled)"
    assert failure_tail([_pod("fine", ok)]) == "" and failure_tail([]) == ""
