"""The local executor: run a plan's steps as subprocesses in a work directory, resumably.

Work directory layout::

    DIR/run.json                    the run: pipeline, plan, overall state
    DIR/steps/<step>/state.json     per step: state, fingerprint, input/output digests, metrics
    DIR/steps/<step>/log.txt        the step's stdout and stderr, every attempt appended
    DIR/artifacts/<step>/<output>   what the steps write (the plan's local storage root)

A step is skipped when its last run succeeded with the same fingerprint (spec and upstream
fingerprints) and both its inputs and its outputs still have the digests recorded then; the run
resumes from the first step that is not. State files are replaced atomically, so a kill -9 at any
moment leaves DIR consistent: a step recorded Running whose process is gone simply runs again.
Ctrl-C stops the running step's whole process group and records it Interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cwm_spec import storage
from cwm_spec.api import StepState
from cwm_spec.plan import Plan, Step
from cwm_spec.storage import tree_digest, write_json_atomic

LOG_TAIL_LINES = 25


class RunError(RuntimeError):
    """The run cannot start or a step failed; the message says which and why."""


# A step's processes find each other through these (torchrun's and the training operator's);
# the runner lays each step out itself, so values inherited from whatever started `cwm run` (a
# torchrun, a test process holding a process group) would send a step to someone else's port.
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                   "LOCAL_WORLD_SIZE", "GROUP_RANK")


def _is_rendezvous_var(name: str) -> bool:
    return name in RENDEZVOUS_VARS or name.startswith(("PET_", "TORCHELASTIC_"))


class StepFailed(RunError):
    """One attempt of a step failed; ``why`` is the short reason (the message adds the log)."""

    def __init__(self, why: str, message: str):
        super().__init__(message)
        self.why = why


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_json(path: Path | str) -> dict[str, Any] | None:
    """A JSON object from the work directory or from storage; None when missing or not one."""
    data = storage.read_json(str(path))
    return data if isinstance(data, dict) else None


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def last_line(path: Path) -> str:
    lines = [ln for ln in tail(path, 5).splitlines() if ln.strip()]
    return lines[-1].strip()[:200] if lines else ""


@dataclass
class StepRecord:
    """What the work directory knows of one step."""

    name: str
    state: StepState = StepState.PENDING
    fingerprint: str | None = None
    attempts: int = 0
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    pid: int | None = None
    returncode: int | None = None
    inputs: dict[str, str | None] = field(default_factory=dict)
    outputs: dict[str, str | None] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    message: str | None = None

    @classmethod
    def load(cls, path: Path, name: str) -> StepRecord:
        data = read_json(path)
        if not data:
            return cls(name)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "state" in known:
            known["state"] = StepState(known["state"])
        return cls(**known)


class Display(Protocol):
    def update(self, records: list[StepRecord], current: str | None, detail: str) -> None: ...
    def close(self) -> None: ...


class PlainDisplay:
    """Line-oriented progress for logs and CI: one line per state change, and a heartbeat."""

    def __init__(self, stream=sys.stderr, heartbeat: float = 30.0):
        self.stream, self.heartbeat = stream, heartbeat
        self.seen: dict[str, str] = {}
        self.last_beat = time.monotonic()
        self.last_detail = ""

    def update(self, records: list[StepRecord], current: str | None, detail: str) -> None:
        for r in records:
            if self.seen.get(r.name) != r.state:
                self.seen[r.name] = r.state
                running = r.state == StepState.RUNNING
                extra = f" ({r.seconds:.1f}s)" if r.seconds is not None and not running else ""
                print(f"[cwm] {r.name}: {r.state}{extra}", file=self.stream, flush=True)
        due = time.monotonic() - self.last_beat > self.heartbeat
        if current and due and detail != self.last_detail:
            self.last_beat, self.last_detail = time.monotonic(), detail
            print(f"[cwm] {current}: {detail}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichDisplay:
    """A live table of steps, their state, time, and the running step's latest log line."""

    STYLE = {StepState.SUCCEEDED: "green", StepState.CACHED: "cyan",
             StepState.FAILED: "bold red", StepState.RUNNING: "yellow",
             StepState.INTERRUPTED: "magenta", StepState.PENDING: "dim"}

    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.live.start()
        self.started: dict[str, float] = {}

    def update(self, records: list[StepRecord], current: str | None, detail: str) -> None:
        table = Table(title="cwm run", expand=False)
        for col in ("step", "state", "time", "detail"):
            table.add_column(col)
        for r in records:
            if r.state == StepState.RUNNING:
                self.started.setdefault(r.name, time.monotonic())
                secs = time.monotonic() - self.started[r.name]
            else:
                secs = r.seconds  # type: ignore[assignment]  # None: not run (shown blank)
            shown = detail if r.name == current else (r.message or "")
            table.add_row(r.name, f"[{self.STYLE.get(r.state, '')}]{r.state}",
                          f"{secs:.0f}s" if secs is not None else "", shown[:100])
        self.live.update(table)

    def close(self) -> None:
        self.live.stop()


try:  # loaded up front: the forked child must not import or load anything
    _LIBC: Any = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc Linux: children simply outlive a killed runner
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: its own process group (so Ctrl-C handling reaches all of it), and SIGKILL
    if the runner dies, so a kill -9 of the runner leaves no orphan step behind."""
    os.setsid()
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _process_alive(pid: int | None, module: str) -> bool:
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z" or not cmdline:  # a zombie is dead
        return False
    return not module or module in cmdline


class LocalRunner:
    """Run a plan in a work directory. ``run()`` returns True when every step succeeded."""

    def __init__(self, plan: Plan, workdir: Path, display: Display | None = None,
                 env: dict[str, str] | None = None):
        self.plan, self.workdir = plan, Path(workdir)
        self.display = display or PlainDisplay()
        self.env = env
        self._checked: set[str] = set()  # object-store roots probed this run

    # ---- paths and records
    def step_dir(self, name: str) -> Path:
        return self.workdir / "steps" / name

    def record(self, name: str) -> StepRecord:
        return StepRecord.load(self.step_dir(name) / "state.json", name)

    def save(self, rec: StepRecord) -> None:
        write_json_atomic(self.step_dir(rec.name) / "state.json", vars(rec))

    def records(self) -> list[StepRecord]:
        return [self.record(s.name) for s in self.plan.steps]

    # ---- decisions (pure given the file system)
    def input_digests(self, step: Step) -> dict[str, str | None]:
        return {k: tree_digest(v) for k, v in sorted(step.inputs.items())}

    def up_to_date(self, step: Step, rec: StepRecord) -> bool:
        if not rec.state.done or rec.fingerprint != step.fingerprint:
            return False
        if rec.inputs != self.input_digests(step):
            return False
        current = {k: tree_digest(v) for k, v in sorted(step.outputs.items())}
        return None not in current.values() and rec.outputs == current

    def missing_implementations(self) -> list[str]:
        missing = []
        for step in self.plan.steps:
            if step.module and importlib.util.find_spec(step.module.split(" ")[0]) is None:
                missing.append(f"step {step.name!r} runs `python -m {step.module}`, which is "
                               "not implemented in this installation")
        return missing

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(f"{self.workdir} is in use by another `cwm run`") from None
            yield

    # ---- execution
    def run(self) -> bool:
        missing = self.missing_implementations()
        if missing:
            raise RunError("cannot run this plan:\n  " + "\n  ".join(missing))
        with self.lock():
            run_file = self.workdir / "run.json"
            write_json_atomic(run_file, {
                "pipeline": self.plan.pipeline, "steps": self.plan.names,
                "state": StepState.RUNNING,
                "started": now(), "finished": None, "storage": self.plan.target.storage_root,
            })
            state = StepState.INTERRUPTED
            try:
                ok = self._run_steps()
                state = StepState.SUCCEEDED if ok else StepState.FAILED
                return ok
            finally:
                info = read_json(run_file) or {}
                info.update(state=state, finished=now())
                write_json_atomic(run_file, info)
                self.display.close()

    def _run_steps(self) -> bool:
        for step in self.plan.steps:
            try:
                self._run_step(step)
            except storage.StorageError as err:  # the store refused or is unreachable
                rec = self.record(step.name)
                rec.state, rec.message = StepState.FAILED, str(err)
                self.save(rec)
                self._show(None, "")
                raise RunError(f"step {step.name!r}: {err}") from None
        self._show(None, "")
        return True

    def _check_storage(self, step: Step) -> None:
        """Probe each object store this step writes (once per run), so bad credentials, a
        missing bucket or an unreachable endpoint stop the run before the step starts."""
        for uri in step.outputs.values():
            root = self.plan.target.storage_root if uri.startswith(
                self.plan.target.storage_root) else uri
            if storage.is_remote(root) and root not in self._checked:
                storage.check_access(root)
                self._checked.add(root)

    def _run_step(self, step: Step) -> None:
        rec = self.record(step.name)
        if rec.state == StepState.RUNNING and rec.pid and _process_alive(rec.pid, step.module):
            # A runner killed with -9 may leave a step's process group behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.pid, signal.SIGKILL)
        self._check_storage(step)
        if self.up_to_date(step, rec):
            if not rec.cached:
                rec.cached, rec.state = True, StepState.CACHED
                self.save(rec)
            self._show(None, "")
            return
        # The operator's semantics: `retries` more attempts after a failure, each attempt with
        # its own deadline. The operator waits a back-off between attempts (the chart's
        # children.retryBackoffSeconds); locally there is nothing to wait for, so the next
        # attempt starts at once.
        for attempt in range(step.retries + 1):
            try:
                self._execute(step, rec)
                return
            except StepFailed as failure:
                if attempt == step.retries:
                    raise RunError(str(failure)) from None
                rec = self.record(step.name)
                rec.message = f"attempt {rec.attempts} failed: {failure.why}; retrying"
                self.save(rec)
                self._show(step.name, rec.message)

    def _show(self, current: str | None, detail: str) -> None:
        self.display.update(self.records(), current, detail)

    def _execute(self, step: Step, rec: StepRecord) -> bool:
        log = self.step_dir(step.name) / "log.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        for out in step.outputs.values():
            if "://" not in out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
        rec = StepRecord(step.name, state=StepState.RUNNING, fingerprint=step.fingerprint,
                         attempts=rec.attempts + 1, started=now(),
                         inputs=self.input_digests(step))
        base = self.env if self.env is not None else os.environ
        env = {**{k: v for k, v in base.items() if not _is_rendezvous_var(k)}, **step.env}
        start = time.monotonic()
        with open(log, "ab") as logf:
            logf.write(f"==> attempt {rec.attempts} at {rec.started}: "
                       f"{' '.join(step.command)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(step.command, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=self.workdir,
                                    preexec_fn=_die_with_parent)
        rec.pid = proc.pid
        self.save(rec)
        deadline = start + step.deadline_seconds if step.deadline_seconds else None
        late = False
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if deadline is not None and time.monotonic() > deadline:
                        late = True
                        self._stop(proc)
                        break
                    self._show(step.name, last_line(log))
        except KeyboardInterrupt:
            self._stop(proc)
            rec.state, rec.message = StepState.INTERRUPTED, "interrupted (Ctrl-C)"
            rec.finished, rec.seconds = now(), time.monotonic() - start
            self.save(rec)
            raise
        rec.returncode, rec.finished = proc.returncode, now()
        rec.seconds, rec.pid = round(time.monotonic() - start, 2), None
        outputs = {k: tree_digest(v) for k, v in sorted(step.outputs.items())}
        absent = [k for k, d in outputs.items() if d is None]
        if late or proc.returncode != 0 or absent:
            why = (f"ran past its deadline of {step.deadline_seconds} s (deadlineSeconds)"
                   if late else f"exited with status {proc.returncode}" if proc.returncode != 0
                   else f"exited 0 but wrote no {', '.join(absent)}")
            rec.state, rec.message = StepState.FAILED, why
            self.save(rec)
            self._show(None, "")
            raise StepFailed(why, f"step {step.name!r} failed: {why}"
                             f" (attempt {rec.attempts} of {step.retries + 1})\n"
                             f"--- last lines of {log} ---\n{tail(log)}")
        rec.state, rec.outputs, rec.message = StepState.SUCCEEDED, outputs, None
        rec.metrics = self._metrics(step)
        self.save(rec)
        self._show(None, "")
        return True

    @staticmethod
    def _metrics(step: Step) -> dict[str, Any]:
        metrics_dir = step.outputs.get("metrics")
        return (read_json(storage.join(metrics_dir, "eval.json")) if metrics_dir else None) or {}

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """Stop the step's whole process group: SIGINT, then SIGTERM, then SIGKILL."""
        for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def summarize(workdir: Path) -> dict[str, Any]:
    """What `cwm status DIR` shows: the run and each step's record."""
    run = read_json(Path(workdir) / "run.json")
    if run is None:
        raise RunError(f"{workdir}: no run here (no run.json)")
    steps = [StepRecord.load(Path(workdir) / "steps" / n / "state.json", n) for n in run["steps"]]
    for rec in steps:
        if rec.state == StepState.RUNNING and not _process_alive(rec.pid, ""):
            rec.state, rec.message = StepState.INTERRUPTED, "process gone (runner killed?)"
    return {"run": run, "steps": steps}
