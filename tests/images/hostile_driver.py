"""Runs INSIDE the cwm-beam container (tests/images/test_hostile_in_container.py mounts this
repository's tests/ read-only at /opt/cwm-tests): the trajectory hostile payloads of
tests/trajectories/fixtures/hostile, each planted in a small repository that the environment
prepares (the sandboxed full-suite run every repository goes through), as in
tests/trajectories/test_hostile.py. Prints one JSON document: the isolation in force and, per
case, what happened and what the case could touch.

    python -m tests.images.hostile_driver            # all cases, each in its own process
    python -m tests.images.hostile_driver <case>     # one case (so kill_parent kills only it)

Targets the payloads aim at, inside the container:
    write_outside  /data/outside/victim.py   (a writable volume, like a PVC)
    read_outside   /secrets/secret.txt       (a read-only volume, like a mounted Secret)
    network        a listener on 127.0.0.1 in this container
    kill_parent    the process running the case (its parent, and pid 1)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from cwm_exec import sandbox
from tests.trajectories.test_hostile import PAYLOADS, plant, prepare, survivors

VICTIM = Path("/data/outside/victim.py")
SECRET = Path("/secrets/secret.txt")
CASES = sorted(p.stem for p in PAYLOADS.glob("*.txt"))


def _listen() -> tuple[socket.socket, list, threading.Event]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:  # the 0.2 s poll timed out (or the listener closed): look again
                pass

    threading.Thread(target=accept, daemon=True).start()
    return listener, accepted, done


def run_case(case: str) -> dict:
    """Plant and prepare one payload; report the environment's verdict and the side effects."""
    root = Path(f"/tmp/hostile-{case}-{uuid.uuid4().hex[:6]}")
    listener, accepted, done = _listen()
    values = {"OUTSIDE": VICTIM, "SECRET": SECRET, "PORT": listener.getsockname()[1],
              "HOST_PID": os.getpid()}
    before = VICTIM.read_text()
    marker = plant(root / "repo", case, **values)
    env, error, seconds = prepare(root / "repo", root / "work")
    time.sleep(0.5)
    done.set()
    listener.close()
    baseline = env.baseline if env else None
    output = baseline.output if baseline else ""
    return {
        "case": case, "seconds": round(seconds, 2), "error": error,
        "reason": baseline.reason if baseline else None,
        "returncode": baseline.returncode if baseline else None,
        "hostile_outcome": baseline.outcomes.get("tests/test_z_hostile.py::test_hostile")
        if baseline else None,
        "suite": env.suite if env else None,
        "victim_changed": VICTIM.read_text() != before,
        "secret_in_output": SECRET.read_text() in output,
        "connections": len(accepted),
        "survivors": survivors(marker),
        "memory_error": "MemoryError" in output,
    }


def main(argv: list[str]) -> int:
    if argv:
        print(json.dumps(run_case(argv[0])))
        return 0
    report = {"isolation": sandbox.isolation(), "describe": sandbox.describe_isolation(),
              "cases": {}}
    for case in CASES:
        done = subprocess.run([sys.executable, "-m", "tests.images.hostile_driver", case],
                              capture_output=True, text=True, timeout=300)
        if done.returncode == 0 and done.stdout.strip():
            report["cases"][case] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            report["cases"][case] = {"case": case, "runner_exit": done.returncode,
                                     "runner_stderr": done.stderr[-1500:]}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
