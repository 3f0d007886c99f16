"""Runs INSIDE a storage step pod on the test node (tests/cluster_e2e/test_s3_in_pods.py passes
this file's source to `python -c` through `kubectl exec` in the pod the operator renders for the
traces step): what the step's own process reaches, and what a program it runs in
``cwm_exec.sandbox`` reaches when offered the step's whole environment.

Prints one JSON document:

- ``listed``: the bucket ``CWM_BUCKET`` listed by the step through ``AWS_ENDPOINT_URL`` (the
  object store's Service) with the credentials the pod got from spec.storage.secret;
- ``step``: raw TCP connections from the step's process to each target: the endpoint URL's host
  and port, then ``CWM_OTHER_TARGETS`` (a JSON list of [host, port]);
- ``program``: the same connections from a program in the sandbox, and the credential-like
  variables (``AWS_*``) it sees;
- ``isolation``: the sandbox mode in force (what a data set's manifest records).

    python -c "$(cat tests/cluster_e2e/store_probe.py)"
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from urllib.parse import urlsplit

import s3fs

from cwm_exec import sandbox

PROGRAM = r"""
import json, os, socket, sys

def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as e:
        return f"{type(e).__name__}: {e}"

targets = json.loads(sys.argv[1])
print(json.dumps({"connections": {f"{h}:{p}": connect(h, p) for h, p in targets},
                  "credentials": sorted(k for k in os.environ if k.startswith("AWS_"))}))
"""


def connect(host: str, port: int) -> str:
    """The step's own process connecting: "connected" or the error's words."""
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def main() -> int:
    endpoint = urlsplit(os.environ["AWS_ENDPOINT_URL"])
    targets = [[endpoint.hostname, endpoint.port or 80],
               *json.loads(os.environ.get("CWM_OTHER_TARGETS", "[]"))]
    listed = s3fs.S3FileSystem(skip_instance_cache=True).ls(os.environ["CWM_BUCKET"])
    with tempfile.TemporaryDirectory() as work:
        done = sandbox.run_command([sys.executable, "-c", PROGRAM, json.dumps(targets)], cwd=work,
                                   limits=sandbox.Limits(), env=dict(os.environ))
    program = (json.loads(done.stdout) if done.returncode == 0 else
               {"returncode": done.returncode, "reason": done.reason,
                "stderr": done.stderr.decode(errors="replace")[-2000:]})
    print(json.dumps({"listed": listed, "isolation": sandbox.isolation_record(),
                      "step": {f"{h}:{p}": connect(h, p) for h, p in targets},
                      "program": program}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
