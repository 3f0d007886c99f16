"""The operator against a real API server (tests/controlplane), as a ServiceAccount bound to
exactly `permissions.RULES`. No kubelet runs: the tests move Jobs and PyTorchJobs through their
lifecycle the way their controllers would (tests/controlplane/lifecycle.py): these scenarios need
outcomes (success, an out-of-memory message, a stuck child) that only the project's images could
produce for real. test_on_node.py runs a step's failure through real pods on the test node."""

from __future__ import annotations

import time

import pytest

from tests.operator.helpers import (
    SETTINGS,
    STEPS,
    TRAIN,
    condition,
    manifest,
    sdk_roundtrip,
    short_manifest,
    write_eval,
)

pytestmark = pytest.mark.cluster


def test_happy_path_runs_every_step_in_order(env, operator) -> None:
    c, name = env.cluster, "happy"
    pipeline = c.create(manifest(name, env.storage))
    latencies, completed_at = [], time.monotonic()
    for i, step in enumerate(STEPS):
        child_name = f"{name}-{step}-1"
        child = c.wait_child(child_name)
        if i:
            latencies.append(time.monotonic() - completed_at)
        meta = child["metadata"]
        assert meta["ownerReferences"][0]["uid"] == pipeline["metadata"]["uid"]
        assert meta["ownerReferences"][0]["controller"] is True
        assert meta["labels"]["cwm.dev/step"] == step
        status = c.wait_status(name, lambda s, step=step, i=i: s.get("currentStep") == step
                               and s.get("progress") == f"{i}/8", f"running {step}")["status"]
        assert status["phase"] == "Running"
        assert condition(status, "Progressing")["status"] == "True"
        assert condition(status, "Accepted")["status"] == "True"
        record = next(r for r in status["steps"] if r["name"] == step)
        assert record["state"] == "Running" and record["attempts"] == 1
        assert record["child"] == child_name
        started = c.kube.wait_for(lambda child_name=child_name: [
                                      e for e in c.events(name) if e["reason"] == "StepStarted"
                                      and child_name in e["message"]],
                                  timeout=10, what=f"the StepStarted event of {step}")
        assert started[0]["type"] == "Normal" and len(c.reasons(name)) == 2 * i + 1
        if step in TRAIN:
            assert child["kind"] == "PyTorchJob"
            master = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
            assert master["containers"][0]["name"] == "pytorch"
            assert master["containers"][0]["command"][0] == "torchrun"
            assert child["spec"]["runPolicy"]["backoffLimit"] == SETTINGS.training_restarts
            sent = {k: child[k] for k in ("apiVersion", "kind", "spec")}
            back = sdk_roundtrip(child)
            assert {k: back[k] for k in ("apiVersion", "kind", "spec")} == sent
            assert back["metadata"]["labels"] == meta["labels"]
            write_eval(env.storage_dir, env.namespace, name, step, {"loss": 1.5 + i, "ok": 1})
        else:
            assert child["kind"] == "Job" and child["spec"]["backoffLimit"] == 0
        c.complete(child_name)
        completed_at = time.monotonic()
    final = c.wait_status(name, lambda s: s.get("phase") == "Succeeded", "Succeeded")["status"]
    assert final["progress"] == "8/8" and "currentStep" not in final
    assert condition(final, "Succeeded")["status"] == "True"
    assert condition(final, "Progressing")["reason"] == "Completed"
    assert condition(final, "Failed")["status"] == "False"
    assert all(c_["observedGeneration"] == 1 for c_ in final["conditions"])
    records = {r["name"]: r for r in final["steps"]}
    assert [r["name"] for r in final["steps"]] == STEPS
    assert all(r["state"] == "Succeeded" and r["finishTime"] for r in records.values())
    assert records["pretrain"]["metrics"] == {"loss": 5.5, "ok": 1.0}
    assert records["traces"]["artifacts"]["dataset"].endswith(f"{env.namespace}/{name}/traces/dataset")
    assert set(c.children(name)) == {f"{name}-{s}-1" for s in STEPS}
    reasons = c.kube.wait_for(lambda: (r := c.reasons(name)).count("StepSucceeded") == 8 and r,
                              timeout=10, what="the events")
    assert reasons.count("StepStarted") == 8 and "PipelineSucceeded" in reasons
    described = c.kube.kubectl("describe", "cwmpipeline", name, "-n", env.namespace,
                               check=True).stdout
    assert "StepSucceeded" in described and "PipelineSucceeded" in described
    row = c.kube.kubectl("get", "cwmp", name, "-n", env.namespace, check=True).stdout
    assert row.splitlines()[1].split()[1:4] == ["Succeeded", "8/8", "True"]
    print(f"\nchild completion → next child created: max {max(latencies):.3f} s, "
          f"mean {sum(latencies) / len(latencies):.3f} s over {len(latencies)} hand-offs")


def test_failed_steps_retry_with_backoff_then_succeed_or_fail_the_pipeline(env) -> None:
    from cwm_operator.main import OperatorThread
    from tests.operator.helpers import SETTINGS, configuration_for

    c, name = env.cluster, "retry"
    # Backoff 1.5 s, then 3 s: long enough to see, and to check it was waited for (a lower
    # bound: Job conditions carry whole seconds, so up to 1 s of it may already be past).
    settings = SETTINGS.fast(retry_backoff_seconds=1.5, retry_backoff_max_seconds=10)
    op = OperatorThread(settings, configuration_for(env.kubeconfig), [env.namespace]).start()
    try:
        _retry_scenario(c, name, env)
    finally:
        op.stop()


def _retry_scenario(c, name, env) -> None:
    c.create(short_manifest(name, env.storage, stages=[
        {"name": "pretrain", "steps": 10, "warmupSteps": 1, "retries": 2},
        {"name": "midtrain", "steps": 10, "warmupSteps": 1, "dataMix": {"code": 1.0},
         "retries": 1},
    ]))
    through_tokenizer(c, name)
    c.fail(f"{name}-pretrain-1", "worker 0 exited with code 1")
    failed_at = time.monotonic()
    status = c.wait_status(name, lambda s: (condition(s, "Progressing") or {}).get("reason")
                           == "RetryBackoff", "waiting to retry")["status"]
    record = next(r for r in status["steps"] if r["name"] == "pretrain")
    assert record["state"] == "Pending" and record["attempts"] == 1
    assert "attempt 1 failed: BackoffLimitExceeded" not in record["message"]
    assert "worker 0 exited with code 1" in record["message"] and "attempt 2 at" in record["message"]
    assert status["phase"] == "Running"
    c.wait_child(f"{name}-pretrain-2")
    waited = time.monotonic() - failed_at
    assert waited >= 0.5, f"retried after {waited:.2f} s: the backoff was not waited for"
    c.complete(f"{name}-pretrain-2")
    c.wait_child(f"{name}-midtrain-1")
    c.fail(f"{name}-midtrain-1", "CUDA error: out of memory")
    c.wait_child(f"{name}-midtrain-2")
    c.fail(f"{name}-midtrain-2", "CUDA error: out of memory")
    final = c.wait_status(name, lambda s: s.get("phase") == "Failed", "Failed")["status"]
    failed = condition(final, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "StepFailed"
    assert "midtrain" in failed["message"] and "out of memory" in failed["message"]
    assert condition(final, "Progressing")["status"] == "False"
    records = {r["name"]: r for r in final["steps"]}
    assert records["pretrain"]["state"] == "Succeeded" and records["pretrain"]["attempts"] == 2
    assert records["midtrain"]["state"] == "Failed" and records["midtrain"]["attempts"] == 2
    time.sleep(1.5)  # longer than any backoff of the fast profile: nothing else may appear
    assert set(c.children(name)) == {f"{name}-tokenizer-1", f"{name}-pretrain-1",
                                     f"{name}-pretrain-2", f"{name}-midtrain-1",
                                     f"{name}-midtrain-2"}
    reasons = c.kube.wait_for(lambda: "PipelineFailed" in (r := c.reasons(name)) and r,
                              timeout=10, what="the PipelineFailed event")
    assert reasons.count("StepFailed") == 3
    warnings = [e for e in c.events(name) if e["type"] == "Warning"]
    assert {e["reason"] for e in warnings} == {"StepFailed", "PipelineFailed"}


def test_suspend_and_resume_the_running_child(env, operator) -> None:
    c, name = env.cluster, "pause"
    c.create(short_manifest(name, env.storage))
    job = f"{name}-tokenizer-1"
    c.wait_child(job)
    c.kube.start_job(job, env.namespace)
    c.patch_spec(name, {"suspend": True})
    c.kube.wait_for(lambda: c.child(job)["spec"].get("suspend") is True, 10, "Job suspended")
    status = c.wait_status(name, lambda s: s.get("phase") == "Suspended", "Suspended")["status"]
    assert condition(status, "Suspended")["status"] == "True"
    assert condition(status, "Progressing")["reason"] == "Suspended"
    c.patch_spec(name, {"suspend": False})
    c.kube.wait_for(lambda: c.child(job)["spec"].get("suspend") is False, 10, "Job resumed")
    c.wait_status(name, lambda s: s.get("phase") == "Running", "Running again")
    c.complete(job)
    ptj = f"{name}-pretrain-1"
    c.wait_child(ptj)
    c.patch_spec(name, {"suspend": True})
    c.kube.wait_for(lambda: c.child(ptj)["spec"]["runPolicy"].get("suspend") is True, 10,
                    "PyTorchJob suspended")
    # A success that lands while suspended is recorded, but nothing new starts.
    c.complete(ptj)
    c.wait_status(name, lambda s: s.get("progress") == "2/3" and s.get("phase") == "Suspended",
                  "pretrain recorded while suspended")
    time.sleep(0.5)
    assert f"{name}-midtrain-1" not in c.children(name)
    c.patch_spec(name, {"suspend": False})
    c.wait_child(f"{name}-midtrain-1")
    reasons = c.kube.wait_for(lambda: (r := c.reasons(name)).count("Resumed") == 2 and r,
                              timeout=10, what="the events")
    assert reasons.count("Suspended") == 2


def test_a_sharded_data_step_runs_as_an_indexed_job(env, operator) -> None:
    """spec.data.beam.pods: the API server takes the Indexed Job; when the Job controller has
    completed every index, the step succeeds and the next data step starts, Indexed too."""
    c, name = env.cluster, "shards"
    doc = manifest(name, env.storage)
    doc["spec"]["data"]["beam"]["pods"] = 3
    c.create(doc)
    child = c.wait_child(f"{name}-traces-1")
    spec = child["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    c.complete(f"{name}-traces-1")
    assert c.wait_child(f"{name}-trajectories-1")["spec"]["completionMode"] == "Indexed"
    status = c.wait_status(name, lambda s: s.get("currentStep") == "trajectories",
                           "trajectories running")["status"]
    assert next(r for r in status["steps"] if r["name"] == "traces")["state"] == "Succeeded"


def through_tokenizer(c, name: str) -> None:
    """A short pipeline's tokenizer Job completes; its pretrain PyTorchJob is created."""
    c.wait_child(f"{name}-tokenizer-1")
    c.complete(f"{name}-tokenizer-1")
    c.wait_child(f"{name}-pretrain-1")


def test_deleting_a_pipeline_deletes_its_children(env, operator) -> None:
    c, name = env.cluster, "doomed"
    c.create(short_manifest(name, env.storage))
    through_tokenizer(c, name)
    c.delete(name)
    c.kube.wait_for(lambda: not c.children(), timeout=60,
                    what="the garbage collector to delete the children")
    time.sleep(0.5)
    assert not c.children()  # and the operator did not re-create any


def test_invalid_spec_gets_a_condition_and_no_children(env, operator) -> None:
    c, name = env.cluster, "invalid"
    doc = short_manifest(name, env.storage)
    del doc["spec"]["storage"]  # the API server accepts it; a cluster run cannot
    doc["spec"]["stages"][0]["warmupSteps"] = 50  # > steps: a model-level rule
    c.create(doc)
    status = c.wait_status(name, lambda s: condition(s, "Accepted") is not None, "a verdict")[
        "status"]
    accepted = condition(status, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert "spec.stages[0]" in accepted["message"] and "warmupSteps 50" in accepted["message"]
    assert status["phase"] == "Failed" and condition(status, "Failed")["reason"] == "InvalidSpec"
    time.sleep(0.5)
    assert not c.children(name)
    # Fixing the spec starts the pipeline.
    c.patch_spec(name, {"stages": short_manifest(name, env.storage)["spec"]["stages"]})
    status = c.wait_status(name, lambda s: condition(s, "Accepted")["reason"] == "InvalidSpec"
                           and "spec.storage" in condition(s, "Accepted")["message"],
                           "the remaining error")["status"]
    c.patch_spec(name, {"storage": {"uri": env.storage}})
    c.wait_child(f"{name}-tokenizer-1")
    c.wait_status(name, lambda s: s.get("phase") == "Running", "Running")
    assert "InvalidSpec" in c.reasons(name)


def test_spec_edits_after_start(env, operator) -> None:
    c, name = env.cluster, "edits"
    c.create(short_manifest(name, env.storage))
    through_tokenizer(c, name)
    # Allowed: a later stage's hyper-parameters (takes effect when midtrain starts).
    stages = short_manifest(name, env.storage)["spec"]["stages"]
    stages[1]["steps"] = 77
    c.patch_spec(name, {"stages": stages})
    # Refused: the model of a stage that is running.
    c.patch_spec(name, {"model": {"preset": "debug"}})
    status = c.wait_status(name, lambda s: (condition(s, "Accepted") or {}).get("reason")
                           == "EditRefused", "the refusal")["status"]
    assert "pretrain" in condition(status, "Accepted")["message"]
    assert condition(status, "Accepted")["observedGeneration"] == 3
    c.complete(f"{name}-pretrain-1")
    time.sleep(0.5)
    assert f"{name}-midtrain-1" not in c.children(name)
    c.patch_spec(name, {"model": {"preset": "tiny"}})  # revert
    mid = c.wait_child(f"{name}-midtrain-1")
    env_vars = mid["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "env"]
    config = next(e["value"] for e in env_vars if e["name"] == "CWM_STEP_CONFIG")
    assert '"steps":77' in config
    status = c.wait_status(name, lambda s: condition(s, "Accepted")["status"] == "True",
                           "accepted again")["status"]
    assert "EditRefused" in c.reasons(name)


def test_a_child_stuck_pending_is_reported(env) -> None:
    from cwm_operator.main import OperatorThread
    from tests.operator.helpers import SETTINGS, configuration_for

    c, name = env.cluster, "stuck"
    settings = SETTINGS.fast(stuck_seconds=1.0)
    with OperatorThread(settings, configuration_for(env.kubeconfig), [env.namespace]):
        c.create(short_manifest(name, env.storage))
        c.wait_child(f"{name}-tokenizer-1")
        status = c.wait_status(name, lambda s: (condition(s, "Stalled") or {}).get("status")
                               == "True", "Stalled", timeout=15)["status"]
        stalled = condition(status, "Stalled")
        assert stalled["reason"] == "ChildPending" and f"{name}-tokenizer-1" in stalled["message"]
        c.kube.start_job(f"{name}-tokenizer-1", env.namespace)
        status = c.wait_status(name, lambda s: condition(s, "Stalled")["status"] == "False",
                               "no longer stalled")["status"]
        assert "ChildStalled" in c.reasons(name)


class OperatorProcess:
    """`python -m cwm_operator` as a real process, killed with SIGKILL (no graceful exit)."""

    def __init__(self, env, log_path) -> None:
        import os
        import sys

        from tests.controlplane.cluster import free_port

        self.health, self.metrics = (f"http://127.0.0.1:{free_port()}/healthz",
                                     f"http://127.0.0.1:{free_port()}/metrics")
        self.argv = [sys.executable, "-m", "cwm_operator", "--namespace", env.namespace,
                     "--kubeconfig", str(env.kubeconfig), "--log-level", "INFO",
                     "--liveness", self.health,
                     "--metrics-port", self.metrics.rsplit(":", 1)[1].split("/")[0]]
        self.env = {**os.environ, "CWM_BEAM_IMAGE": "cwm-beam:test",
                    "CWM_TRAINER_IMAGE": "cwm-trainer:test", "CWM_RETRY_BACKOFF_SECONDS": "0.2",
                    "CWM_STUCK_SECONDS": "60"}
        self.log_path = log_path
        self.proc = None
        self.starts = 0

    def start(self) -> None:
        import subprocess

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.starts += 1

    def get(self, url: str) -> str:
        import urllib.request

        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def test_operator_killed_at_every_step_boundary_and_mid_step(env, tmp_path) -> None:
    import random

    c, name = env.cluster, "phoenix"
    op = OperatorProcess(env, tmp_path / "operator.log")
    rng = random.Random(8)
    try:
        op.start()
        c.create(manifest(name, env.storage))
        for i, step in enumerate(STEPS):
            child = f"{name}-{step}-1"
            c.wait_child(child, timeout=60)
            op.kill()  # mid-step: the child exists, the operator is gone
            if step in TRAIN:
                c.kube.start_pytorchjob(child, env.namespace)
            else:
                c.kube.start_job(child, env.namespace)
            if i % 2 == 0:
                c.complete(child)  # the step ends while no operator runs
                op.start()  # resumes at the boundary from status + children
            else:
                op.start()
                c.wait_status(name, lambda s, step=step: any(
                    r["name"] == step and r["state"] == "Running" for r in s.get("steps", [])),
                    "resumed",
                              timeout=60)
                c.complete(child)
                time.sleep(rng.uniform(0.0, 0.15))  # kill while it reacts to the completion
                op.kill()
                op.start()
        final = c.wait_status(name, lambda s: s.get("phase") == "Succeeded", "Succeeded",
                              timeout=60)["status"]
        c.kube.wait_for(lambda: op.get(op.health) is not None, 30, "the liveness endpoint")
        metrics = c.kube.wait_for(lambda: 'cwm_pipelines{phase="Succeeded"} 1.0' in (
            m := op.get(op.metrics)) and m, 30, "the metrics to show the pipeline")
        assert "cwm_reconcile_errors_total" in metrics and "cwm_api_requests_total" in metrics
    except BaseException:
        print(op.log_path.read_text()[-5000:])
        raise
    finally:
        op.kill()
    assert set(c.children(name)) == {f"{name}-{s}-1" for s in STEPS}  # zero duplicates
    assert final["progress"] == "8/8" and condition(final, "Succeeded")["status"] == "True"
    assert [(r["name"], r["state"], r["attempts"]) for r in final["steps"]] == [
        (s, "Succeeded", 1) for s in STEPS]
    import json

    lines = [json.loads(line) for line in op.log_path.read_text().splitlines()
             if line.startswith("{")]
    statuses = [line for line in lines if line.get("phase")]
    assert statuses and all(line["object"]["name"] == name for line in statuses)
    assert statuses[-1]["phase"] == "Succeeded"
    print(f"\noperator started {op.starts} times, killed {op.starts} times")
    assert op.starts == 1 + len(STEPS) + len(STEPS) // 2


@pytest.mark.slow
def test_fifty_pipelines_at_once_all_complete(env) -> None:
    """50 full pipelines (400 children) at once; prints API requests per pipeline and the
    child-completion → next-child-creation latency (benchmarks/operator_load.py reports them)."""
    from tests.operator.helpers import describe_load, run_load

    result = run_load(env.cluster.kube, env.namespace, env.kubeconfig, env.storage, 50)
    assert result["children"] == 50 * len(STEPS)  # one child per step: no duplicates
    print("\n" + describe_load(result))
