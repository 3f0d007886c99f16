"""The fork server behind ``sandbox.TracePool``: runs inside the sandbox, one forked child per job.

Started once per pool worker (``python -S -E``, so start-up is paid once, not per program); reads
jobs from stdin and writes replies to stdout, each a 4-byte big-endian length and a JSON body.
Each job runs in a forked child (forked, and limited, before its job arrives) with:

* its own process group (killed whole on timeout), ``RLIMIT_CPU``, ``RLIMIT_AS``,
  ``RLIMIT_FSIZE`` = the output cap on its stdout/stderr file (``SIGXFSZ`` past it), no core;
* an audit hook (PEP 578) that refuses what a pure function has no business doing: network,
  processes, signals, writing files, reading files outside the Python installation, ctypes,
  threads, ``sys.settrace``/``setprofile``, ``os._exit``. A refusal raises ``SandboxViolation``
  (a BaseException) and the job becomes a dead letter naming it. Audit hooks can be bypassed by
  determined code; they exist to give clear reasons, while the OS layers (bubblewrap namespaces,
  rlimits, pids cgroup) are what actually contain a program.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import select
import signal
import struct
import sys
import time

from cwm_exec import tracer

_BLOCKED_PREFIXES = (
    "socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "os.system", "os.popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.remove",
    "os.unlink", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.link",
    "os.symlink", "os.truncate", "os.chdir", "os.chroot", "os.chflags", "os.lchown",
    "os.setxattr", "os.removexattr", "os.utime", "os.putenv", "os.unsetenv", "shutil.",
    "ctypes.", "_thread.start_new_thread", "sys.addaudithook", "sys.setprofile", "urllib.",
    "http.client.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.",
    "webbrowser.", "mmap.", "pty.", "resource.", "sys.remote_exec", "os.startfile", "tempfile.",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_REAL_EXIT = os._exit


class SandboxViolation(BaseException):
    """Raised into the traced program when it attempts something the sandbox refuses."""


class Guard:
    """The audit-hook policy for one job (installed once per forked child)."""

    def __init__(self, read_roots: tuple[str, ...]) -> None:
        self.read_roots = read_roots
        self.violation: str | None = None
        self.tracer_file = tracer.__file__

    def __call__(self, event: str, args: tuple) -> None:
        if event == "open":
            self._check_open(args)
        elif event == "sys.settrace":
            # Allowed: the tracer's own calls, and the interpreter switching tracing off after
            # the tracer raised to stop a program that hit a limit.
            caller = sys._getframe(1).f_code.co_filename
            active = tracer.active_recorder()
            if caller != self.tracer_file and not (active is not None and active.truncated):
                self._refuse("sys.settrace called by the traced program")
        elif event.startswith(_BLOCKED_PREFIXES):
            self._refuse(f"{event} refused")

    def _check_open(self, args: tuple) -> None:
        path, mode, flags = (tuple(args) + (None, None, 0))[:3]
        if isinstance(path, int):
            return  # an already-open descriptor (stdout and stderr go to a capped file)
        path = os.fsdecode(path) if isinstance(path, bytes) else str(path)
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            bool((flags or 0) & _WRITE_FLAGS)
        if writing:
            self._refuse(f"write to {path!r} refused")
        full = os.path.abspath(path)
        if not full.startswith(self.read_roots):
            self._refuse(f"read of {path!r} outside the sandbox refused")

    def _refuse(self, message: str) -> None:
        if self.violation is None:
            self.violation = message
        raise SandboxViolation(message)


_GUARD: Guard | None = None


def _forbidden_exit(*_args) -> None:
    if _GUARD is not None:
        _GUARD._refuse("os._exit refused")
    raise SandboxViolation("os._exit refused")


def write_message(fd: int, message: dict) -> None:
    data = json.dumps(message).encode()
    _write_all(fd, struct.pack(">I", len(data)) + data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _failure(stage: str, reason: str, detail: str = "") -> dict:
    return {"failure": {"stage": stage, "reason": reason, "detail": detail[:2000]}}


_RESOURCE_ERRORS = {"MemoryError": "memory limit (MemoryError)",
                    "RecursionError": "recursion limit (RecursionError)",
                    "SystemExit": "program called exit (SystemExit)",
                    "KeyboardInterrupt": "KeyboardInterrupt raised",
                    "SandboxViolation": "sandbox violation"}


def run_job(job: dict, guard: Guard) -> dict:
    """Trace one program (in the forked child, limits already applied)."""
    limits = tracer.TraceLimits(**job.get("trace_limits", {}))
    try:
        result = tracer.trace_function(job["source"], job["entry"], job["args"], limits=limits,
                                       marked=job.get("marked"))
    except tracer.ProgramError as err:
        return _failure("setup", "program error", str(err))
    except SandboxViolation:
        return _failure("sandbox", f"sandbox violation: {guard.violation}")
    except MemoryError:
        return _failure("trace", "memory limit (MemoryError)")
    except BaseException as err:  # the tracer itself must never take the worker down silently
        return _failure("trace", "tracer error", f"{type(err).__name__}: {err}")
    if guard.violation:
        return _failure("sandbox", f"sandbox violation: {guard.violation}")
    if result.exception_type in _RESOURCE_ERRORS:
        return _failure("trace", _RESOURCE_ERRORS[result.exception_type],
                        result.exception or "")
    return {"ok": result.to_json()}


def _output_file(limits: dict, pid: int) -> str:
    """Job ``pid``'s stdout and stderr: in the folder the pool named (``scratch``)."""
    return f"{limits['scratch']}/job-{pid}.out"


def _prepare(limits: dict) -> None:
    """The spare's setup that no job changes, done before its job arrives: default signal
    actions, stdin from ``/dev/null``, stdout and stderr to a file capped by ``RLIMIT_FSIZE``,
    and the CPU, memory, file-size and core limits."""
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    out = os.open(_output_file(limits, os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    cpu = max(1, int(limits["cpu_seconds"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = limits["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["output_bytes"], limits["output_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child(job: dict, reply_fd: int, read_roots: tuple[str, ...]) -> None:
    """Run one job in the prepared spare: the audit hook first, then the trace."""
    global _GUARD
    guard = _GUARD = Guard(read_roots)
    sys.addaudithook(guard)
    os._exit = _forbidden_exit  # type: ignore[assignment]  # refuses to exit, see _forbidden_exit
    try:
        reply = run_job(job, guard)
    except BaseException as err:
        reply = _failure("trace", "worker error", repr(err))
    try:
        write_message(reply_fd, reply)
    except BaseException:
        _REAL_EXIT(3)
    _REAL_EXIT(0)


def _describe_status(status: int, limits: dict) -> str:
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        if sig == "SIGXCPU":
            return f"cpu limit ({limits['cpu_seconds']}s, SIGXCPU)"
        if sig == "SIGXFSZ":
            return f"output limit ({limits['output_bytes']} bytes, SIGXFSZ)"
        if sig == "SIGKILL":
            return "killed by SIGKILL (cpu hard limit or memory)"
        return f"killed by {sig}"
    return f"exited with code {os.WEXITSTATUS(status)} without a result (os._exit or a crash)"


def supervise(pid: int, reply_fd: int, limits: dict) -> dict | bytes:
    """Collect the child's reply within the wall-clock deadline.

    A complete reply (4-byte length and body) is returned as soon as it is read, as bytes: the
    child is reaped afterwards (:func:`reap`), while the pool already works on the reply. When
    the child hung, overflowed or died without a complete reply, it is killed and reaped here and
    the failure says why."""
    deadline = time.monotonic() + limits["wall_seconds"]
    cap = limits["reply_bytes"]
    chunks: list[bytes] = []
    total, wanted = 0, None
    outcome: dict | None = None
    while wanted is None or total < wanted:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            outcome = _failure("trace", f"wall-clock timeout ({limits['wall_seconds']}s)")
            break
        ready, _, _ = select.select([reply_fd], [], [], remaining)
        if not ready:
            continue
        data = os.read(reply_fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
        total += len(data)
        if total > cap:
            outcome = _failure("trace", f"result larger than {cap} bytes")
            break
        if wanted is None and total >= 4:
            wanted = 4 + struct.unpack(">I", b"".join(chunks)[:4])[0]
    body = b"".join(chunks)
    if outcome is None and wanted is not None and total == wanted:
        os.close(reply_fd)
        return body[4:]   # passed on as is: the pool parses it (one JSON round, not three)
    status = reap(pid, limits)
    os.close(reply_fd)
    return outcome or _failure("trace", _describe_status(status, limits))


def reap(pid: int, limits: dict) -> int:
    """Kill a job's process group (anything it left behind) and collect its exit status."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _, status = os.waitpid(pid, 0)
    try:
        os.unlink(_output_file(limits, pid))
    except OSError:
        pass
    return status


def _read_job(fd: int) -> dict | None:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        data += chunk
    return json.loads(data[4:])


def spawn(limits: dict, read_roots: tuple[str, ...]) -> tuple[int, int, int]:
    """Fork the child for the *next* job now, from the clean server, before that job arrives:
    forking costs milliseconds here, and this way it overlaps the current job, as does the
    child's job-independent setup (:func:`_prepare`). The child then waits for its job on a pipe
    (holding none of the server's other pipes) and runs it as :func:`_child`. Returns
    ``(pid, job pipe, reply pipe)``."""
    job_r, job_w = os.pipe()
    reply_r, reply_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            low, high = sorted((job_r, reply_w))
            os.closerange(3, low)
            os.closerange(low + 1, high)
            os.closerange(high + 1, 1 << 16)
            _prepare(limits)
            job = _read_job(job_r)
            os.close(job_r)
            if job is not None:
                _child(job, reply_w, read_roots)
            os.unlink(_output_file(limits, os.getpid()))   # no job: the server closed or died
        finally:
            _REAL_EXIT(4)
    os.setpgid(pid, pid)   # its own group from the start, so a kill never misses it
    os.close(job_r)
    os.close(reply_w)
    return pid, job_w, reply_r


# A job traced by the server itself once before its first fork: what the first trace allocates
# and caches (the tracer's and the JSON encoder's lazily built state) is then shared by every
# child instead of rebuilt in each one.
_WARM_UP = {"source": "def f(xs):\n    ys = [x * 2 for x in xs]\n    return {'n': len(ys)}\n",
            "entry": "f", "args": "[1, 2]"}


def warm_up(read_roots: tuple[str, ...]) -> None:
    """Trace :data:`_WARM_UP` here (no audit hook: it is not the server's policy), then move
    every object to the collector's permanent generation, so that no child's collection writes
    to the pages it shares with the server (each write there costs a copy-on-write fault)."""
    json.dumps(run_job(_WARM_UP, Guard(read_roots)))
    gc.collect()
    gc.freeze()


def _read_raw(stream) -> bytes | None:
    """One framed message as it came (header and body), or ``None`` at end of input."""
    header = stream.read(4)
    if len(header) < 4:
        return None
    body = stream.read(struct.unpack(">I", header)[0])
    return header + body


def main() -> None:
    limits = json.loads(sys.argv[1])
    read_roots = tuple(json.loads(sys.argv[2]))
    stdin = sys.stdin.buffer
    out_fd = sys.stdout.fileno()
    warm_up(read_roots)
    spare = spawn(limits, read_roots)
    while True:
        job = _read_raw(stdin)   # passed on to the child unparsed: the child reads it
        pid, job_w, reply_r = spare
        if job is None:
            os.close(job_w)      # the spare reads end-of-file and exits
            os.close(reply_r)
            reap(pid, limits)
            return
        try:
            _write_all(job_w, job)
        except OSError:
            pass                 # the spare died: supervise reports it
        os.close(job_w)
        spare = spawn(limits, read_roots)
        reply = supervise(pid, reply_r, limits)
        if isinstance(reply, bytes):
            _write_all(out_fd, struct.pack(">I", len(reply)) + reply)
            reap(pid, limits)
        else:
            write_message(out_fd, reply)


if __name__ == "__main__":
    main()
