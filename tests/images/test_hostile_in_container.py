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


# What the environment reports for each repository payload inside the container, and whether
# the case stayed inside: "contained" means the sandbox (limits, session, process group) or the
# pod's own settings stopped it; the fs/network cases are NOT stopped by the sandbox here.
EXPECTED_ESCAPES = {"write_outside"}  # a writable volume is writable by the pod's own user


def test_hostile_repositories_in_the_container(images: dict[str, str], pod: PodRunner,
                                               tmp_path: Path) -> None:
    data, victim, mounts = volumes(tmp_path)
    mounts.append(bind(str(REPO / "tests"), "/opt/cwm-tests/tests"))
    result = pod.run(images["cwm-beam"], ["-m", "tests.images.hostile_driver"],
                     entrypoint=["python"], mounts=mounts, timeout=900,
                     env={"PYTHONPATH": "/opt/cwm-tests", "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.exit_code == 0, result.logs[-4000:]
    report = json.loads(result.logs.strip().splitlines()[-1])
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))
    print(f"\nisolation in the container: {report['isolation']}: {report['describe']}")
    cases = report["cases"]
    for name, case in cases.items():
        print(f"  {name}: {json.dumps(case)}")
    assert report["isolation"] == "rlimits", "bubblewrap worked in the container: update the docs"
    for name, case in cases.items():
        assert "runner_exit" not in case, f"{name}: the process running the case died: {case}"
        assert case["survivors"] == [], f"{name}: processes outlived the sandbox"
        assert case["seconds"] < 60, name
    assert cases["infinite_loop"]["reason"].startswith(("wall-clock timeout", "cpu limit"))
    assert cases["fork_bomb"]["reason"].startswith("wall-clock timeout")
    assert cases["memory_bomb"]["memory_error"]
    assert cases["deep_recursion"]["reason"].startswith("killed by SIG")
    assert "output limit" in (cases["big_stdout"]["reason"] or cases["big_stdout"]["error"])
    assert cases["os_exit_conftest"]["error"] and "exit 3" in cases["os_exit_conftest"]["error"]
    assert cases["kill_parent"]["suite"] == ["tests/test_a_ok.py::test_double"]
    escaped = {name for name, case in cases.items() if case["victim_changed"]}
    assert escaped == EXPECTED_ESCAPES and victim.read_text() == "escaped"
    assert cases["read_outside"]["secret_in_output"], "the read-only secret volume is readable"
    assert cases["network"]["connections"] == 1, "loopback inside the pod is reachable"
