"""Runs INSIDE a step pod on the test node (tests/netpol/test_hostile_in_pod.py starts it with
`kubectl exec` in a pod the operator rendered; this file and the suite's files come in through a
ConfigMap at /opt/cwm-tests). Prints one JSON document:

- ``pod``: what the pod itself gives, read from inside (user, read-only root, seccomp mode,
  no_new_privs, effective capabilities, whether a service-account token is mounted);
- ``isolation``: the sandbox mode in force and its reason (what the manifest would record);
- ``cases``: every case of tests/images/hostile_driver.py (the trajectory hostile suite, each
  payload planted in a repository the environment prepares), plus the network payload aimed at
  two Services inside the cluster instead of the pod's loopback: ``network_service`` (a ClusterIP
  Service backed by a real pod, ``CWM_TARGET_HOST:CWM_TARGET_PORT``) and ``network_api`` (the
  ``kubernetes`` Service); and ``read_step_env``: the read_outside payload aimed at
  ``/proc/1/environ``, the environment of the step's own process (a fake credential in it);
- ``step``: the same two connections made by the step's own process, outside the sandbox: what
  the NetworkPolicy alone does.

    python -m tests.netpol.hostile_pod
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from cwm_exec import sandbox
from tests.images import hostile_driver
from tests.trajectories.test_hostile import plant, prepare, survivors

TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
LOOPBACK = '"127.0.0.1"'
SECCOMP_MODES = {"0": "disabled", "1": "strict", "2": "filter"}  # /proc/<pid>/status: Seccomp


def pod_facts() -> dict:
    """What the pod's security context gives, as the kernel reports it to this process."""
    lines = Path("/proc/self/status").read_text().splitlines()
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    probe = Path("/usr") / f"cwm-probe-{uuid.uuid4().hex[:6]}"
    try:
        probe.write_text("x")
        probe.unlink()
        root_writable = True
    except OSError:
        root_writable = False
    return {"uid": os.getuid(), "gid": os.getgid(), "root_writable": root_writable,
            "seccomp": SECCOMP_MODES.get(status["Seccomp"].strip()),
            "no_new_privs": status["NoNewPrivs"].strip() == "1",
            "cap_eff": status["CapEff"].strip(), "token_mounted": TOKEN.exists(),
            "env_secrets": sorted(k for k in os.environ if "SECRET" in k or "TOKEN" in k
                                  or k.startswith("AWS_"))}


def connect(host: str, port: int) -> str:
    """The step process itself connecting: "connected" or the error's words."""
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def retargeted(case: str, payload: str, target: str, values: dict,
               moved: tuple[str, str] | None = None) -> dict:
    """One of the suite's payloads planted as it is, with `values` filled in and, if `moved`,
    one literal of it replaced (the network payload's loopback address by a Service's)."""
    root = Path(f"/tmp/hostile-{case}-{uuid.uuid4().hex[:6]}")
    marker = plant(root / "repo", payload, **values)
    if moved:
        test = root / "repo" / "tests" / "test_z_hostile.py"
        text = test.read_text()
        if moved[0] not in text:
            raise SystemExit(f"the {payload} payload no longer holds {moved[0]}: update {__file__}")
        test.write_text(text.replace(*moved))
    env, error, seconds = prepare(root / "repo", root / "work")
    baseline = env.baseline if env else None
    return {"case": case, "target": target, "seconds": round(seconds, 2), "error": error,
            "hostile_outcome": baseline.outcomes.get("tests/test_z_hostile.py::test_hostile")
            if baseline else None,
            "output_tail": (baseline.output if baseline else "")[-600:],
            "survivors": survivors(marker)}


def network_case(case: str, host: str, port: int) -> dict:
    """The network payload aimed at `host:port` (a Service of the cluster) instead of the pod's
    loopback."""
    return retargeted(case, "network", f"{host}:{port}", {"PORT": port},
                      (LOOPBACK, json.dumps(host)))


def step_env_case() -> dict:
    """The read_outside payload aimed at /proc/1/environ: the environment of the container's
    main process (in a step pod, the step itself), where a credential given to the step as a
    variable would be (the pod sets a fake one, ``CWM_FAKE_CREDENTIAL``)."""
    return retargeted("read_step_env", "read_outside", "/proc/1/environ",
                      {"SECRET": "/proc/1/environ"})


def run_driver_case(case: str) -> dict:
    """One case of the suite in its own process (kill_parent then kills only that process)."""
    done = subprocess.run([sys.executable, "-m", "tests.images.hostile_driver", case],
                          capture_output=True, text=True, timeout=300)
    if done.returncode == 0 and done.stdout.strip():
        return json.loads(done.stdout.strip().splitlines()[-1])
    return {"case": case, "runner_exit": done.returncode, "runner_stderr": done.stderr[-1500:]}


def main() -> int:
    target = (os.environ["CWM_TARGET_HOST"], int(os.environ["CWM_TARGET_PORT"]))
    api = (os.environ["KUBERNETES_SERVICE_HOST"], int(os.environ["KUBERNETES_SERVICE_PORT"]))
    report = {"pod": pod_facts(), "isolation": sandbox.isolation_record(),
              "describe": sandbox.describe_isolation(),
              "step": {"service": connect(*target), "api": connect(*api)}, "cases": {}}
    for case in hostile_driver.CASES:
        report["cases"][case] = run_driver_case(case)
    report["cases"]["network_service"] = network_case("network_service", *target)
    report["cases"]["network_api"] = network_case("network_api", *api)
    report["cases"]["read_step_env"] = step_env_case()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
