"""``spec.storage.secret``, end to end on the operator's side: the Secret reaches every step's
pods as their environment (``envFrom`` in every container of every replica: every step reads its
inputs from and writes its outputs to the store) and nowhere else (no volume, no file, no single
variable); and the untrusted programs those pods run get none of it: a real data step, started
with the Secret's variables in its environment as a pod is, traces programs that look for them.
Rendering is pure (no cluster); the data step runs for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cwm_operator.render import render_child
from cwm_spec import artifacts
from cwm_spec.plan import Target, build_plan
from cwm_spec.validation import parse_pipeline
from tests.operator.helpers import REPO, SETTINGS

SECRET = "store-credentials"


def plan_with(secret: str | None, pods: int = 1) -> tuple[Any, Any]:
    """examples/cluster.yaml (every step kind, 8-node PyTorchJobs), with ``secret``; the data
    steps Indexed Jobs of ``pods`` pods."""
    doc = yaml.safe_load((REPO / "examples" / "cluster.yaml").read_text())
    doc["spec"]["storage"] = {"uri": "s3://bucket/runs", **({"secret": secret} if secret else {})}
    if pods > 1:  # pods split the in-process runner's work (Flink distributes its own)
        doc["spec"]["data"]["beam"] = {"runner": "DirectRunner", "pods": pods}
    pipeline = parse_pipeline(doc, target="cluster", default_images=SETTINGS.default_images)
    return pipeline, build_plan(pipeline, Target.cluster(pipeline, "research",
                                                         SETTINGS.default_images))


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(replica, pod spec) of a rendered Job or PyTorchJob."""
    if obj["kind"] == "PyTorchJob":
        for replica, spec in obj["spec"]["pytorchReplicaSpecs"].items():
            yield replica, spec["template"]["spec"]
    else:
        yield "pod", obj["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize("pods", [1, 3])
def test_the_storage_secret_is_the_environment_of_every_step_pod_and_nothing_else(pods):
    pipeline, plan = plan_with(SECRET, pods)
    kinds = set()
    for step in plan.steps:
        obj = render_child(pipeline, "research", step, 1, SETTINGS)
        count = 0
        for replica, pod in pod_specs(obj):
            for container in containers(pod):
                where = (step.name, replica, container["name"])
                assert container.get("envFrom") == [{"secretRef": {"name": SECRET}}], where
                count += 1
            assert not any("secret" in volume for volume in pod.get("volumes", [])), step.name
        # The Secret's name appears once per container (its envFrom) and in no other field.
        assert json.dumps(obj).count(f'"{SECRET}"') == count, step.name
        kinds.add((obj["kind"], tuple(sorted(r for r, _ in pod_specs(obj)))))
    assert {s.name for s in plan.steps} >= {"traces", "trajectories", "tokenizer", "pretrain",
                                            "rl"}
    assert ("PyTorchJob", ("Master", "Worker")) in kinds and ("Job", ("pod",)) in kinds


def test_without_a_secret_no_pod_gets_one():
    pipeline, plan = plan_with(None)
    for step in plan.steps:
        for _, pod in pod_specs(render_child(pipeline, "research", step, 1, SETTINGS)):
            assert all("envFrom" not in c for c in containers(pod)), step.name


# Traced programs that look for the Secret: in their environment, by name and by value; and in
# every /proc/<pid>/environ they can read (the step that started them holds the Secret).
ENVIRONMENT = '''
def f(secret):
    import os
    names = sorted(k for k in os.environ if k.startswith(("AWS_", "AZURE_", "GOOGLE_")))
    return [names, sorted(k for k, v in os.environ.items() if v == secret)]
'''
PROCESSES = '''
def f(secret):
    import os
    found = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    found += secret.encode() in fh.read()
            except OSError:
                pass
    return found
'''


@pytest.mark.slow
def test_programs_a_data_step_runs_see_none_of_the_secret(tmp_path: Path):
    """The traces step, run with the Secret's variables in its environment (as ``envFrom`` puts
    them in a pod), traces programs that search for them; what they found is in the traces'
    return values. Their environment holds none of them (by name or value). Other processes'
    environments: reading them is refused as a sandbox violation (a dead letter), or under
    bubblewrap finds only the sandbox's own processes (PID namespace)."""
    secret = "s3cr3t-" + os.urandom(12).hex()
    programs = tmp_path / "programs.jsonl"
    programs.write_text("".join(
        json.dumps({"id": name, "code": code, "input": repr(secret)}) + "\n"
        for name, code in (("environment", ENVIRONMENT), ("processes", PROCESSES))))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "cwm-key-id", "AWS_SECRET_ACCESS_KEY": secret,
           "AZURE_STORAGE_KEY": secret, "GOOGLE_APPLICATION_CREDENTIALS": "/var/run/gcp.json",
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "traces"
    done = subprocess.run([sys.executable, "-m", "cwm_beam.traces", "--source",
                           f"jsonl:{programs}", "--output", str(out), "--shards", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    traced = {r["id"]: r for split in ("train", "validation")
              for r in artifacts.iter_records(str(out), split)}
    dead = {r["id"]: r for r in artifacts.iter_records(str(out), "deadletter")}
    assert eval(traced["jsonl/environment"]["return"]) == [[], []], dead  # a repr
    if "jsonl/processes" in traced:
        assert eval(traced["jsonl/processes"]["return"]) == 0
    else:
        assert dead["jsonl/processes"]["reason"].startswith("sandbox violation: read of '/proc/")
