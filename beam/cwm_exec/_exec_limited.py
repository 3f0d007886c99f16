"""Set the sandbox's resource limits on this process, then exec the sandboxed command.

The first step of every sandboxed process: :mod:`cwm_exec.sandbox` starts it as
``python -S -E -c ... SPEC COMMAND...`` instead of running a ``preexec_fn`` between fork and
exec. Python code there makes ``subprocess`` use ``fork`` instead of ``vfork``, and a fork of a
process with gRPC threads (every Beam SDK worker has them) runs gRPC's and abseil's fork
handlers, which crash the child now and then: measured, 68 of 300 spawns died with SIGSEGV in a
process with busy gRPC threads, none without a ``preexec_fn``
(``tests/traces/test_sandbox.py::test_spawning_is_safe_beside_grpc_threads``).

SPEC is a dict, ``marshal``-ed and hex-encoded (the format of this very interpreter, which the
parent also runs; importing ``json`` would double this step's start-up): ``cgroup`` (a
``cgroup.procs`` file to join, or None), ``cpu_seconds`` (the soft ``RLIMIT_CPU``; the hard limit
is one second more; None for none), ``memory_bytes`` (``RLIMIT_AS``), ``processes``
(``RLIMIT_NPROC``, or None) and ``env`` (the command's whole environment, passed as is: this
interpreter may add to its own, e.g. by coercing a C locale). No core dumps. This step takes
~10 ms, and its CPU time counts against the command's CPU limit.
"""

from __future__ import annotations

import marshal
import os
import resource
import sys


def encode_spec(spec: dict) -> str:
    return marshal.dumps(spec).hex()


def main() -> None:
    spec = marshal.loads(bytes.fromhex(sys.argv[1]))
    command = sys.argv[2:]
    if spec.get("cgroup"):
        with open(spec["cgroup"], "w") as f:
            f.write(str(os.getpid()))
    if spec.get("cpu_seconds") is not None:
        soft = int(spec["cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
    memory = int(spec["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if spec.get("processes") is not None:
        processes = int(spec["processes"])
        resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    try:
        os.execvpe(command[0], command, spec["env"])
    except OSError as err:
        sys.stderr.write(f"cannot start {command[0]!r}: {err}\n")
        sys.stderr.flush()
        os._exit(127)


if __name__ == "__main__":
    main()
