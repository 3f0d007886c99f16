"""The hostile-program suites inside the cwm-beam container, run as its pods run (uid 65532,
read-only root, no capabilities, Docker's default seccomp profile = Kubernetes' RuntimeDefault,
no network). Which layer contains each case there is recorded in docs/benchmarks.md; the
expectations below are that table, so a change of behaviour fails here first.

Inside the container bubblewrap cannot create namespaces (the default seccomp profile refuses
unshare/clone with new namespaces to an unprivileged user), so the sandbox runs in its
``rlimits`` mode: its resource limits, its own session and process group, the tracer's audit hook
(traces), and otherwise only what the pod itself allows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cwm_spec import artifacts
from tests.images.plans import cluster_plan, host_path, tiny_doc
from tests.images.podrun import PodRunner, bind
from tests.traces.hostile import HOSTILE

pytestmark = [pytest.mark.images, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
POD_UID = 65532
SECRET = "the-secret-in-a-read-only-volume"


def volumes(tmp_path: Path) -> tuple[Path, Path, list]:
    """/data (writable, the PVC), /data/outside/victim.py in it, /secrets (read-only)."""
    data, secrets = tmp_path / "data", tmp_path / "secrets"
    (data / "outside").mkdir(parents=True)
    secrets.mkdir()
    victim = data / "outside" / "victim.py"
    victim.write_text("pristine\n")
    (secrets / "secret.txt").write_text(SECRET)
    for path in (data, data / "outside", victim):
        os.chown(path, POD_UID, POD_UID)
    os.chmod(secrets / "secret.txt", 0o644)
    mounts = [bind(str(data), "/data", read_only=False), bind(str(secrets), "/secrets")]
    return data, victim, mounts


def test_hostile_programs_in_the_traces_step(images: dict[str, str], pod: PodRunner,
                                             tmp_path: Path) -> None:
    """Every hostile program of tests/traces/hostile.py is a dead letter with a reason, through
    the traces step's own command; nothing is written outside, the secret is in no record."""
    data, _, mounts = volumes(tmp_path)
    targets = {"write_outside": "'/data/outside/pwned.txt'",
               "read_outside": "'/secrets/secret.txt'"}
    rows = [{"id": name, "code": code, "input": targets.get(name, "1")}
            for name, code in HOSTILE.items()]
    (data / "hostile.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = tiny_doc("hostile-traces")
    doc["spec"]["data"]["traces"] = {"sources": [{"kind": "jsonl", "uri": "/data/hostile.jsonl"}],
                                     "fuzzInputsPerFunction": 0, "shards": 1}
    doc["spec"]["data"]["sandbox"] = {"wallSeconds": 3, "cpuSeconds": 3}
    step = cluster_plan(doc).step("traces")
    result = pod.run(step.image, step.command, env=step.env, mounts=mounts, timeout=600)
    assert result.exit_code == 0, result.logs[-4000:]
    out = str(host_path(data, step.outputs["dataset"]))
    dead = {d["id"]: d for d in artifacts.iter_records(out, "deadletter")}
    reasons = {name: dead[f"jsonl/{name}"]["reason"] for name in HOSTILE}
    print("\n" + "\n".join(f"  traces/{name}: {reason}" for name, reason in reasons.items()))
    assert all(reasons.values()), reasons
    assert not (data / "outside" / "pwned.txt").exists()
    kept = [r for split in ("train", "validation") for r in artifacts.iter_records(out, split)]
    assert not kept and SECRET not in json.dumps(list(dead.values()))


# Inside the container the sandbox has no namespaces (see the module docstring): what holds is
# its limits, its session/process group and the pod's own settings. These cases get past it, as
# measured (docs/benchmarks.md); a change of behaviour fails here, so the docs stay true.
NOT_CONTAINED = {
    "write_outside": "wrote into a writable volume (the pod's user may write it)",
    "read_outside": "read a file of a read-only volume (the pod's user may read it)",
    "network": "connected to a listener on the pod's own loopback",
    "kill_parent": "SIGKILLed the process running the sandbox (same user, same PID namespace)",
}


def test_what_contains_hostile_repositories_in_the_container(
        images: dict[str, str], pod: PodRunner, tmp_path: Path) -> None:
    data, victim, mounts = volumes(tmp_path)
    mounts.append(bind(str(REPO / "tests"), "/opt/cwm-tests/tests"))
    result = pod.run(images["cwm-beam"], ["python", "-m", "tests.images.hostile_driver"],
                     mounts=mounts, timeout=900,
                     env={"PYTHONPATH": "/opt/cwm-tests", "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.exit_code == 0, result.logs[-4000:]
    report = json.loads(result.logs.strip().splitlines()[-1])
    print(f"\nisolation in the container: {report['isolation']}: {report['describe']}")
    cases = report["cases"]
    for name, case in cases.items():
        print(f"  {name}: " + json.dumps({k: (v[:200] if isinstance(v, str) else v)
                                          for k, v in case.items()}))
    assert report["isolation"] == "rlimits", "bubblewrap worked in the container: update the docs"
    # Contained by the sandbox's limits, each with the environment's reason:
    assert cases["infinite_loop"]["reason"].startswith(("wall-clock timeout", "cpu limit")), \
        cases["infinite_loop"]
    assert cases["fork_bomb"]["reason"].startswith("wall-clock timeout"), cases["fork_bomb"]
    assert cases["memory_bomb"]["memory_error"], cases["memory_bomb"]
    assert cases["memory_bomb"]["hostile_outcome"] == "failed", cases["memory_bomb"]
    assert cases["deep_recursion"]["reason"].startswith("killed by SIG"), cases["deep_recursion"]
    assert "output limit" in cases["big_stdout"]["error"], cases["big_stdout"]
    assert "exit 3" in cases["os_exit_conftest"]["error"], cases["os_exit_conftest"]
    assert cases["os_exit"]["hostile_outcome"] is None, cases["os_exit"]
    assert cases["os_exit"]["returncode"] == 0, cases["os_exit"]
    for name, case in cases.items():
        if name != "kill_parent":
            assert case["survivors"] == [], f"{name}: processes outlived the sandbox"
            assert case["seconds"] < 60, name
    # Not contained by the sandbox here (the pod's settings bound what they reach):
    assert cases["write_outside"]["victim_changed"], cases["write_outside"]
    assert victim.read_text() == "escaped"
    # the hostile test passed: its open() of the secret succeeded
    assert cases["read_outside"]["hostile_outcome"] == "passed", cases["read_outside"]
    assert cases["network"]["connections"] == 1, cases["network"]
    assert cases["kill_parent"].get("runner_exit") == -9, cases["kill_parent"]
    escaped = {n for n, c in cases.items()
               if c.get("victim_changed") or c.get("connections") or c.get("runner_exit")
               or (n == "read_outside" and c["hostile_outcome"] == "passed")}
    assert escaped == set(NOT_CONTAINED), escaped
