"""Repository environments: a repository prepared once, then a fresh sandboxed copy per task.

``prepare()`` fetches the source (:mod:`.repos`), copies it to a pristine *base*, finds the
import path (``src/`` layout or flat), and runs the whole test suite once in the sandbox with
per-test line coverage. The tests that pass there are the environment's suite ("an image whose
tests pass", as CWM/SWE-smith build); tests failing on the pristine tree are recorded and left
out. Every later run (task validation, grading, the agent's ``bash``) happens in a throw-away
copy through an :class:`Executor`:

- :class:`SandboxExecutor`: :func:`cwm_exec.sandbox.run_command` (bubblewrap on a workstation;
  rlimits inside a Kubernetes worker pod, where the pod itself is the per-repository image);
- :class:`DockerExecutor`: one container per repository through the ``docker`` SDK, when a
  Docker engine is reachable (a developer laptop).

Inside bubblewrap the task copy is mounted at ``/repo``, so observations do not depend on where
the copy lives on the host (a replayed episode sees the same paths).

By default tests run under this process's own interpreter, so only repositories whose suites
need nothing beyond the standard library and pytest work. With ``dependencies=True``,
:mod:`.envbuild` installs what the repository declares into a cached virtual environment and
the suite (and every later run) uses that :class:`Interpreter` instead; ``build`` records how
far the build got.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cwm_exec import sandbox
from cwm_forager import envbuild
from cwm_forager.mutations import function_lines
from cwm_forager.pytest_plugin import is_test_file
from cwm_forager.repos import RepositoryError, RepoSource, copy_tree, fetch

if TYPE_CHECKING:
    from cwm_forager.tasks import Task

MOUNT = "/repo"
PLUGIN = "cwm_forager.pytest_plugin"
PYTEST_ARGS = ("-q", "-p", "no:cacheprovider", "-p", PLUGIN, "-o", "addopts=",
               "--tb=short", "-W", "ignore::DeprecationWarning")
# In a built environment DeprecationWarnings are shown, neither ignored nor errors: a suite that
# checks the ones it raises (Deprecated's) fails under the ignore above, and one whose ini makes
# them errors (python-dateutil's) cannot import its test modules under the newest dependencies.
BUILT_PYTEST_ARGS = (*PYTEST_ARGS[:-2], "-W", "default::DeprecationWarning")


@dataclass
class TestReport:
    """What one sandboxed pytest run said: per-test outcome, optional per-test coverage, and
    how the process ended (``reason`` names a limit or signal; ``None`` for a plain exit)."""

    outcomes: dict[str, str]
    coverage: dict[str, dict[str, list[int]]]
    returncode: int
    reason: str | None
    output: str
    wall_seconds: float

    @property
    def failed(self) -> list[str]:
        return sorted(t for t, o in self.outcomes.items() if o in ("failed", "error"))

    @property
    def passed(self) -> list[str]:
        return sorted(t for t, o in self.outcomes.items() if o == "passed")

    def not_passing(self, selected: Iterable[str]) -> list[str]:
        """Selected tests that did not pass, counting tests the run never reached (a crash or
        a timeout) as not passing."""
        return sorted(t for t in selected if self.outcomes.get(t) != "passed")


@dataclass(frozen=True)
class Interpreter:
    """The Python that runs a repository's tests: ``python``, extra import ``paths`` (after
    the repository's own) and host folders the sandbox must show read-only (``binds``)."""

    python: str = sys.executable
    paths: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()

    @property
    def own(self) -> bool:
        """Whether this is the pipeline's own interpreter (not a built environment)."""
        return self.python == sys.executable


class Executor(Protocol):
    def run(self, argv: Sequence[str], *, workdir: Path, limits: sandbox.Limits,
            env: Mapping[str, str], extra_rw: Sequence[str] = (), at_mount: bool = False,
            extra_ro: Sequence[str] = ()) -> sandbox.ProcessResult: ...

    def close(self) -> None: ...


class SandboxExecutor:
    """Runs in :mod:`cwm_exec.sandbox`. With ``at_mount`` and bubblewrap, ``workdir`` is also
    mounted at ``/repo`` and the command starts there."""

    def run(self, argv: Sequence[str], *, workdir: Path, limits: sandbox.Limits,
            env: Mapping[str, str], extra_rw: Sequence[str] = (), at_mount: bool = False,
            extra_ro: Sequence[str] = ()) -> sandbox.ProcessResult:
        binds: list[Any] = list(extra_rw)
        if at_mount and sandbox.isolation() == "bwrap":
            binds.append((str(workdir), MOUNT))
            argv = ["/bin/sh", "-c", f'cd {MOUNT} && exec "$@"', "sh", *argv]
        return sandbox.run_command(argv, cwd=workdir, limits=limits, env=env, binds_rw=binds,
                                   binds_ro=extra_ro)

    def close(self) -> None:
        pass


class DockerExecutor:
    """One long-lived container per environment (``docker`` SDK), the host work root mounted at
    the same path, no network, memory and process caps; each command is a ``docker exec``
    under ``timeout``. The image must carry Python with pytest and this package."""

    def __init__(self, workroot: Path, image: str = "python:3.11-slim") -> None:
        import docker  # noqa: PLC0415 (only developer laptops with an engine use this executor)

        self.client = docker.from_env()
        self.client.ping()
        self.container = self.client.containers.run(
            image, ["sleep", "infinity"], detach=True, network_disabled=True, auto_remove=True,
            volumes={str(workroot): {"bind": str(workroot), "mode": "rw"},
                     sandbox.PACKAGE_PARENT: {"bind": "/opt/cwm", "mode": "ro"}},
            mem_limit="2g", pids_limit=256)

    def run(self, argv: Sequence[str], *, workdir: Path, limits: sandbox.Limits,
            env: Mapping[str, str], extra_rw: Sequence[str] = (), at_mount: bool = False,
            extra_ro: Sequence[str] = ()) -> sandbox.ProcessResult:
        if extra_ro:
            raise RepositoryError("backend 'docker': built environments (dependencies=True) "
                                  "are not mounted into the container; use backend 'sandbox'")
        env = {**env, "PATH": "/usr/local/bin:/usr/bin:/bin",
               "PYTHONPATH": env.get("PYTHONPATH", "") + ":/opt/cwm"}
        start = time.monotonic()
        cmd = ["timeout", "-s", "KILL", str(int(limits.wall_seconds + 1)), *argv]
        code, (out, err) = self.container.exec_run(cmd, workdir=str(workdir), environment=env,
                                                   demux=True)
        out, err = out or b"", err or b""
        cap = limits.output_bytes
        truncated = len(out) + len(err) > cap
        timed_out = code == 137
        return sandbox.ProcessResult(code, out[:cap], err[: max(0, cap - len(out))],
                                     time.monotonic() - start, timed_out, truncated,
                                     "wall-clock timeout" if timed_out else None)

    def close(self) -> None:
        try:
            self.container.kill()
        except Exception:  # already gone: auto_remove
            pass


def make_executor(backend: str, workroot: Path) -> Executor:
    """``sandbox``, ``docker``, or ``auto`` (docker when an engine answers, else sandbox)."""
    if backend == "sandbox":
        return SandboxExecutor()
    if backend in ("docker", "auto"):
        try:
            return DockerExecutor(workroot)
        except Exception as err:
            if backend == "docker":
                raise RepositoryError(f"backend 'docker': no Docker engine reachable ({err})") from err
            return SandboxExecutor()
    raise ValueError(f"backend {backend!r}: choose sandbox, docker or auto")


@dataclass
class RepoEnvironment:
    """One repository, prepared once; see the module docstring.

    ``limits`` bound every agent action and single test run; the full-suite runs of
    :meth:`prepare` get ``suite_seconds`` of wall and CPU time instead."""

    source: RepoSource
    limits: sandbox.Limits = field(default_factory=sandbox.Limits)
    workroot: Path | None = None
    backend: str = "sandbox"
    suite_seconds: float = 180.0
    dependencies: bool = False  # build an environment of the declared dependencies (.envbuild)
    build_sdists: bool = False  # ... building wheel-less ones inside the sandbox
    resolve_before: str | None = None  # ... from uploads before this ISO date (reproducible)
    requirement_changes: envbuild.Advice | None = None  # ... amended (prepare_with_advice)
    interpreter: Interpreter = field(default_factory=Interpreter)
    build: envbuild.BuildResult | None = None  # what the environment build did (dependencies)
    # set by prepare()
    base: Path | None = None
    pythonpath: tuple[str, ...] = ()
    suite: list[str] = field(default_factory=list)
    baseline_failing: list[str] = field(default_factory=list)
    coverage: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    baseline: TestReport | None = None  # the pristine suite run (how it ended, what it said)
    _executor: Executor | None = None
    _owns_workroot: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.source, RepoSource):
            self.source = RepoSource.from_spec(self.source)

    @property
    def name(self) -> str:
        return self.source.name

    # ------------------------------------------------------------------ preparation

    def prepare(self) -> RepoEnvironment:
        """Fetch, copy, run the suite once with coverage. Idempotent."""
        if self.base is not None:
            return self
        if self.workroot is None:
            self.workroot = Path(tempfile.mkdtemp(prefix="cwm-forager-"))
            self._owns_workroot = True
        self.workroot = Path(self.workroot).resolve()
        self._executor = make_executor(self.backend, self.workroot)
        pristine = fetch(self.source)
        base = self.workroot / _safe(self.name) / "base"
        shutil.rmtree(base, ignore_errors=True)
        copy_tree(pristine, base)
        self.base = base
        self.pythonpath = ("src",) if (base / "src").is_dir() else (".",)
        if self.dependencies:
            self._build_environment(pristine)
        # A test module that cannot even be imported (a tool's self-test needing what the project
        # never declares) is left out like a failing test instead of ending the whole run.
        report = self.run_tests(base, coverage=True, seconds=self.suite_seconds,
                                keep_going=True)
        if self.build is not None:
            self.build.tests_passed, self.build.tests_failed = len(report.passed), len(report.failed)
            self.build.test_reason = report.reason
            self.build.seconds["test"] = round(report.wall_seconds, 2)
            self.build.stage, self.build.ok = ("done", True) if report.passed else ("test", False)
        if not report.passed:
            raise RepositoryError(
                f"repository {self.name}: no test passes on the pristine tree "
                f"(reason {report.reason}, exit {report.returncode}):\n{report.output[-1500:]}")
        self.suite = report.passed
        self.baseline_failing = report.failed
        self.baseline = replace(report, coverage={}, output=report.output[-20000:])
        self.coverage = {t: report.coverage.get(t, {}) for t in self.suite}
        return self

    def _build_environment(self, tree: Path) -> None:
        """Install the declared dependencies (:func:`.envbuild.build`) and use that venv."""
        self.build = envbuild.BuildResult(self.name)
        try:
            built = envbuild.build(tree, self.build, build_sdists=self.build_sdists,
                                   uploaded_prior_to=self.resolve_before,
                                   changes=self.requirement_changes)
        except envbuild.EnvBuildError as err:
            raise RepositoryError(f"repository {self.name}: environment build stopped at "
                                  f"{err.stage}: {err}") from err
        # This package's parent last on the path: the pytest plugin, nothing of the venv's.
        self.interpreter = Interpreter(built.python, (*built.paths, sandbox.PACKAGE_PARENT),
                                       (str(built.venv), *built.paths))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
        if self._owns_workroot and self.workroot is not None:
            shutil.rmtree(self.workroot, ignore_errors=True)

    def __enter__(self) -> RepoEnvironment:
        return self.prepare()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the source tree

    def source_files(self) -> list[str]:
        """Relative paths of the non-test Python files (what mutations may touch)."""
        assert self.base is not None, "prepare() first"
        return sorted(str(p.relative_to(self.base)) for p in self.base.rglob("*.py")
                      if not is_test_file(str(p.relative_to(self.base)))
                      and p.name not in ("setup.py", "conftest.py", "noxfile.py")
                      and "docs" not in p.relative_to(self.base).parts)

    def read(self, relpath: str) -> str:
        assert self.base is not None, "prepare() first"
        return (self.base / relpath).read_text(encoding="utf-8")

    def covering_tests(self) -> dict[tuple[str, str], list[str]]:
        """(file, function qualified name) → the suite's tests that execute a line of its body."""
        lines_of: dict[str, dict[str, tuple[int, int]]] = {}
        out: dict[tuple[str, str], set[str]] = {}
        for test, files in self.coverage.items():
            for path, lines in files.items():
                if path not in lines_of:
                    try:
                        lines_of[path] = function_lines(self.read(path))
                    except (SyntaxError, OSError, UnicodeDecodeError):
                        lines_of[path] = {}
                for func, (lo, hi) in lines_of[path].items():
                    if any(lo < line <= hi for line in lines):  # body lines, not the def line
                        out.setdefault((path, func), set()).add(test)
        return {key: sorted(tests) for key, tests in sorted(out.items())}

    # ------------------------------------------------------------------ task copies and runs

    def fresh_task_copy(self, task: Task | None = None) -> Path:
        """A new private copy of the base, with the task's mutation applied if given."""
        assert self.base is not None and self.workroot is not None, "prepare() first"
        label = _safe(task.task_id if task else "copy")
        dest = self.workroot / _safe(self.name) / "tasks" / f"{label}-{uuid.uuid4().hex[:8]}"
        copy_tree(self.base, dest)
        if task is not None:
            (dest / task.path).write_text(task.mutated, encoding="utf-8")
        return dest

    def restore_tests(self, workdir: Path) -> None:
        """Put the pristine test files back (grading must not trust edited tests)."""
        assert self.base is not None
        for src in self.base.rglob("*.py"):
            rel = src.relative_to(self.base)
            if is_test_file(str(rel)):
                (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, workdir / rel)

    def discard(self, workdir: Path) -> None:
        shutil.rmtree(workdir, ignore_errors=True)

    def environment(self, workdir: Path | str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Process environment for commands in ``workdir`` (import path set, hashing fixed)."""
        root = str(workdir)
        paths = [root if p == "." else f"{root}/{p}" for p in self.pythonpath]
        if self.interpreter.own:
            # No auto-loaded pytest plugins: the venv's (hypothesis, timeout ...) cost start-up
            # time and make runs depend on what happens to be installed.
            return sandbox.default_env({"PYTHONPATH": ":".join(paths),
                                        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **(extra or {})})
        # A built environment holds what the repository declared, its pytest plugins included
        # (fixtures such as pytest-mock's ``mocker``): they load as in the project's own CI.
        bin_dir = Path(self.interpreter.python).parent
        return sandbox.default_env({"PYTHONPATH": ":".join([*paths, *self.interpreter.paths]),
                                    "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
                                    "VIRTUAL_ENV": str(bin_dir.parent), **(extra or {})})

    def run(self, argv: Sequence[str], workdir: Path, *, limits: sandbox.Limits | None = None,
            at_mount: bool = False, extra_env: Mapping[str, str] | None = None,
            extra_rw: Sequence[str] = ()) -> sandbox.ProcessResult:
        """Run a command in a task copy through the executor (the agent's ``bash``)."""
        assert self._executor is not None, "prepare() first"
        root = MOUNT if at_mount and isinstance(self._executor, SandboxExecutor) \
            and sandbox.isolation() == "bwrap" else str(workdir)
        return self._executor.run(argv, workdir=workdir, limits=limits or self.limits,
                                  env=self.environment(root, extra_env), extra_rw=extra_rw,
                                  at_mount=at_mount, extra_ro=self.interpreter.binds)

    def run_tests(self, workdir: Path, tests: Sequence[str] | None = None, *,
                  coverage: bool = False, seconds: float | None = None,
                  keep_going: bool = False) -> TestReport:
        """Run the selected tests (default: the whole suite) of a copy in the sandbox;
        ``keep_going``: past modules that fail to import (pytest stops at them otherwise)."""
        assert self.workroot is not None
        selected = list(tests) if tests is not None else (self.suite or None)
        with tempfile.TemporaryDirectory(dir=self.workroot, prefix="report-") as tmp:
            report_file, select_file = Path(tmp) / "report.jsonl", Path(tmp) / "select.txt"
            extra = {"CWM_REPORT": str(report_file)}
            argv = [self.interpreter.python, "-m", "pytest",
                    *(PYTEST_ARGS if self.interpreter.own else BUILT_PYTEST_ARGS)]
            if keep_going:
                argv.append("--continue-on-collection-errors")
            if selected is not None:
                select_file.write_text("\n".join(selected) + "\n", encoding="utf-8")
                extra["CWM_SELECT"] = str(select_file)
                argv += sorted({t.split("::", 1)[0] for t in selected})
            if coverage:
                extra["CWM_TRACE"] = str(workdir)
            limits = self.limits if seconds is None else replace(
                self.limits, wall_seconds=seconds, cpu_seconds=seconds)
            result = self.run(argv, workdir, limits=limits, extra_env=extra, extra_rw=[tmp])
            outcomes, cov = _read_report(report_file)
        output = (result.stdout + result.stderr).decode("utf-8", errors="replace")
        return TestReport(outcomes, cov, result.returncode, result.reason, output,
                          result.wall_seconds)


# Keys of a repository spec that choose how its environment is built, not where it comes from
# (both spellings: a spec's YAML camelCase, a dumped model's field names).
BUILD_OPTIONS = {"dependencies": "dependencies", "buildSdists": "build_sdists",
                 "build_sdists": "build_sdists", "resolveBefore": "resolve_before",
                 "resolve_before": "resolve_before"}


class Environments:
    """Repository environments by source spec, each prepared on first use in a private
    folder; :meth:`close` removes them all. For a process that works tasks of a few
    repositories (evaluation, RL) and knows when it is done."""

    def __init__(self, limits: sandbox.Limits, prefix: str = "cwm-envs-") -> None:
        self.limits = limits
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.envs: dict[str, RepoEnvironment] = {}

    def get(self, spec: Mapping[str, Any]) -> RepoEnvironment:
        """The prepared environment of a source spec; the spec may also carry the build
        options of :data:`BUILD_OPTIONS` (``{"pypi": "x==1", "dependencies": true}``)."""
        key = json.dumps(spec, sort_keys=True)
        if key not in self.envs:
            options = {BUILD_OPTIONS[k]: v for k, v in spec.items() if k in BUILD_OPTIONS}
            source = RepoSource.from_spec({k: v for k, v in spec.items() if k not in BUILD_OPTIONS})
            self.envs[key] = RepoEnvironment(source, limits=self.limits, **options,
                                             workroot=self.root / str(len(self.envs))).prepare()
        return self.envs[key]

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Environments:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _read_report(path: Path) -> tuple[dict[str, str], dict[str, dict[str, list[int]]]]:
    outcomes: dict[str, str] = {}
    coverage: dict[str, dict[str, list[int]]] = {}
    if not path.exists():
        return outcomes, coverage
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            outcomes[record["nodeid"]] = record["outcome"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a killed run
        if "lines" in record:
            coverage[record["nodeid"]] = record["lines"]
    return outcomes, coverage


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)[:80]
