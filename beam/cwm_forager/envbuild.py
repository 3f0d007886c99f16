"""Deterministic environments for any Python repository: declared dependencies → resolved pins
→ a wheels-only virtual environment cached by those pins → the suite run in the sandbox.

CWM's RepoAgent builds environments with a model; this is the deterministic first pass
(issue 22). Stages, each recorded in a :class:`BuildResult` (``stage`` is the last one reached,
``error`` says why it stopped there):

``parse``
    :func:`declared_requirements` reads, without running any of the repository's code:
    ``pyproject.toml`` (PEP 621 ``dependencies`` and test extras, PEP 735 ``dependency-groups``),
    ``setup.cfg`` (``install_requires``, test ``extras_require``), ``setup.py`` when its
    ``setup()`` keywords are literals (read with :mod:`ast`, never executed), ``requirements*.txt``
    and test requirement files (following ``-r``), and ``tox.ini``'s ``[testenv] deps``.
    Test extras/groups/files are those named ``test``, ``tests``, ``testing`` (or ``dev`` where
    none of those exists). ``pytest`` is added when nothing declares it.
``resolve``
    ``pip install --dry-run --ignore-installed --only-binary :all: --report``: the full pinned
    set (``name==version``), from wheels only, so resolving runs no build backend. With a fixed
    ``uploaded_prior_to`` date the answer is kept under ``$CWM_CACHE/envs/resolutions`` and
    reused for the same declared set. The project itself is dropped from the pins when a
    dependency requires it (its tree is on the path). Where a dependency has no wheel, pip's
    words and the names it gave are recorded (``missing_wheels``).
    With ``build_sdists=True`` those are then built by ``pip wheel`` *inside the sandbox*
    (network on for the download, the host's files out of reach) into a per-repository
    wheelhouse, and the resolve is repeated against it; otherwise the build stops here.
``install``
    A virtual environment per resolved set at ``$CWM_CACHE/envs/<key>`` (``key``: a hash of
    the sorted pins, the Python version and platform), filled by ``pip --python <venv> install
    --no-deps --only-binary :all:`` of exactly those pins. Installing a wheel unpacks files and
    runs none of the package's code. A second repository with the same pins reuses it.
``test``
    The repository's suite run by :class:`~cwm_forager.env.RepoEnvironment` in
    :mod:`cwm_exec.sandbox` with that interpreter (time, memory, process and output limits, no
    network); the counts of passed and failed tests are recorded. ``done`` when a test passed.

The repository itself is not installed (its build backend would run its code): its import path
is the ``src/`` or top folder as for every environment, and a ``.dist-info`` written from the
sdist's ``PKG-INFO`` (name, version, entry points; no code) lets ``importlib.metadata`` find it.

Where this deterministic pass fails (no wheel, a conflict, a test dependency nobody declared),
:func:`prepare_with_advice` asks an :class:`Advisor` (:class:`OpenAIAdvisor`: any
OpenAI-compatible endpoint, as the trajectories' ``openai`` policy uses) for :class:`Advice`,
requirements to add and to drop, given the failure and the repository's dependency files, and
builds again; every round is recorded in ``BuildResult.advice``.
"""

from __future__ import annotations

import ast
import configparser
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from cwm_exec import sandbox
from cwm_forager.repos import RepositoryError, cache_root, fetch

if TYPE_CHECKING:
    from cwm_forager.env import RepoEnvironment

TEST_NAMES = ("test", "tests", "testing")
FALLBACK_NAMES = ("dev",)
REQUIREMENT_FILES = ("requirements.txt",)
TEST_REQUIREMENT_FILES = (
    "requirements-test.txt", "requirements-tests.txt", "requirements_test.txt",
    "requirements-testing.txt", "test-requirements.txt", "tests-requirements.txt",
    "test_requirements.txt", "requirements/test.txt", "requirements/tests.txt",
    "requirements/testing.txt", "tests/requirements.txt", "test/requirements.txt",
)
DEV_REQUIREMENT_FILES = ("requirements-dev.txt", "dev-requirements.txt", "requirements/dev.txt")
STAGES = ("parse", "resolve", "build-sdists", "install", "test", "done")
PIP_TIMEOUT = 900


class EnvBuildError(RuntimeError):
    """A stage failed; ``stage`` names it and the message says why."""

    def __init__(self, stage: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.stage = stage
        self.details = details


# ---------------------------------------------------------------------------------------------
# parse: declared requirements, read without running the repository's code


@dataclass(frozen=True)
class Declared:
    """What a repository declares: requirement strings (deduplicated, in first-seen order),
    where each group came from, and what was left out and why."""

    project: str | None
    version: str | None
    requirements: tuple[str, ...]
    sources: tuple[str, ...]
    skipped: tuple[str, ...] = ()


class _Collector:
    """Accumulates requirements from several files; expands the project's own extras."""

    def __init__(self, project: str | None) -> None:
        self.project = canonicalize_name(project) if project else None
        self.reqs: list[str] = []
        self.sources: list[str] = []
        self.skipped: list[str] = []
        self.self_extras: set[str] = set()

    def add(self, source: str, lines: Iterable[str]) -> None:
        added = 0
        for text in lines:
            text = text.strip()
            if not text:
                continue
            try:
                req = Requirement(text)
            except InvalidRequirement as err:
                self.skipped.append(f"{source}: {text!r} ({err})")
                continue
            if self.project and canonicalize_name(req.name) == self.project:
                self.self_extras |= {canonicalize_name(e) for e in req.extras}
                continue  # the project itself: never installed, only its extras are followed
            if req.url:
                self.skipped.append(f"{source}: {text!r} (a direct URL, not resolved from an index)")
                continue
            if str(req) not in self.reqs:
                self.reqs.append(str(req))
            added += 1
        self.sources.append(f"{source} ({added})")


def declared_requirements(tree: Path) -> Declared:
    """All the runtime and test requirements ``tree`` declares (module docstring, ``parse``)."""
    tree = Path(tree)
    pyproject = _read_toml(tree / "pyproject.toml")
    project_table = pyproject.get("project", {}) if isinstance(pyproject, dict) else {}
    cfg = _read_cfg(tree / "setup.cfg")
    setup_kw, setup_why = _static_setup(tree / "setup.py")
    name, version = _project_identity(tree, project_table, cfg, setup_kw)
    out = _Collector(name)
    if "dependencies" in project_table:
        out.add("pyproject.toml [project] dependencies", _strings(project_table["dependencies"]))
    extras: dict[str, list[str]] = {
        canonicalize_name(k): _strings(v)
        for k, v in project_table.get("optional-dependencies", {}).items()}
    extras_src = "pyproject.toml [project.optional-dependencies]"
    if cfg.has_section("options"):
        out.add("setup.cfg [options] install_requires",
                _cfg_list(cfg.get("options", "install_requires", fallback="")))
    if cfg.has_section("options.extras_require") and not extras:
        extras = {canonicalize_name(k): _cfg_list(v) for k, v in cfg.items("options.extras_require")}
        extras_src = "setup.cfg [options.extras_require]"
    if setup_kw.keys() & {"install_requires", "tests_require", "extras_require"}:
        out.add("setup.py install_requires", _strings(setup_kw.get("install_requires", [])))
        out.add("setup.py tests_require", _strings(setup_kw.get("tests_require", [])))
        if not extras:
            extras = {canonicalize_name(k): _strings(v)
                      for k, v in dict(setup_kw.get("extras_require", {})).items()}
            extras_src = "setup.py extras_require"
    if setup_why:
        out.skipped.append(setup_why)
    _add_named(out, extras, extras_src)
    groups = pyproject.get("dependency-groups", {}) if isinstance(pyproject, dict) else {}
    _add_groups(out, groups)
    _add_requirement_files(out, tree)
    _add_tox(out, tree)
    for extra in sorted(out.self_extras):   # "pkg[test]" inside another extra or file
        if extra in extras:
            out.add(f"{extras_src} [{extra}] (referenced as the project's extra)", extras[extra])
    if not any(canonicalize_name(Requirement(r).name) == "pytest" for r in out.reqs):
        out.add("added: the suite runs under pytest", ["pytest"])
    return Declared(name, version, tuple(out.reqs), tuple(out.sources),
                    tuple(dict.fromkeys(out.skipped)))


def _add_named(out: _Collector, named: dict[str, list[str]], source: str) -> None:
    """The test extras (or ``dev`` when there are none) of one table."""
    picked = [n for n in TEST_NAMES if n in named] or [n for n in FALLBACK_NAMES if n in named]
    for name in picked:
        out.add(f"{source} [{name}]", named[name])
        out.self_extras.discard(name)


def _add_groups(out: _Collector, groups: dict[str, Any]) -> None:
    """PEP 735 groups, with ``{include-group = ...}`` entries expanded (cycles refused)."""
    norm: dict[str, Any] = {canonicalize_name(k): v for k, v in groups.items()}

    def expand(name: str, seen: tuple[str, ...]) -> list[str]:
        if name in seen:
            raise EnvBuildError("parse", f"pyproject.toml [dependency-groups] {name}: "
                                f"include-group cycle {' -> '.join((*seen, name))}")
        items: list[str] = []
        for entry in norm.get(name, []):
            if isinstance(entry, dict) and "include-group" in entry:
                items += expand(canonicalize_name(entry["include-group"]), (*seen, name))
            elif isinstance(entry, str):
                items.append(entry)
        return items

    picked = [n for n in TEST_NAMES if n in norm] or [n for n in FALLBACK_NAMES if n in norm]
    for name in picked:
        out.add(f"pyproject.toml [dependency-groups] {name}", expand(name, ()))


def _add_requirement_files(out: _Collector, tree: Path) -> None:
    tests = [f for f in TEST_REQUIREMENT_FILES if (tree / f).is_file()]
    files = [f for f in REQUIREMENT_FILES if (tree / f).is_file()]
    files += tests or [f for f in DEV_REQUIREMENT_FILES if (tree / f).is_file()]
    for rel in files:
        lines = requirement_file_lines(tree, tree / rel, out.skipped)
        out.add(rel, lines)


def requirement_file_lines(tree: Path, path: Path, skipped: list[str],
                           seen: tuple[Path, ...] = ()) -> list[str]:
    """Requirement strings of a pip requirements file: ``-r`` files inside ``tree`` followed,
    continuation lines joined, comments, hashes and options dropped (options and editable or
    local paths are recorded in ``skipped``)."""
    path = path.resolve()
    if path in seen:
        return []
    rel = _rel(tree, path)
    text = path.read_text(encoding="utf-8", errors="replace").replace("\\\n", " ")
    lines: list[str] = []
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        line = re.sub(r"\s--hash[= ]\S+", "", line).strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ", "-r", "--requirement=")):
            target = re.sub(r"^(-r|--requirement)[= ]?\s*", "", line)
            inner = (path.parent / target).resolve()
            if inner.is_file() and tree.resolve() in inner.parents:
                lines += requirement_file_lines(tree, inner, skipped, (*seen, path))
            else:
                skipped.append(f"{rel}: {line!r} (not a file inside the repository)")
        elif line.startswith("-") or line.startswith((".", "/")) or "://" in line:
            skipped.append(f"{rel}: {line!r} (an option, editable or local path: not resolved)")
        else:
            lines.append(line)
    return lines


def _add_tox(out: _Collector, tree: Path) -> None:
    """``[testenv] deps``: plain requirement lines only (factor-conditional and substituted
    lines are skipped and recorded; ``-r`` files are followed)."""
    cfg = _read_cfg(tree / "tox.ini")
    if not cfg.has_option("testenv", "deps"):
        return
    lines: list[str] = []
    for line in cfg.get("testenv", "deps", raw=True).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line or re.match(r"^[\w.,!-]+:\s", line):
            out.skipped.append(f"tox.ini [testenv] deps: {line!r} (substitution or factor)")
        elif line.startswith("-r"):
            target = tree / line[2:].strip()
            if target.is_file():
                lines += requirement_file_lines(tree, target, out.skipped)
            else:
                out.skipped.append(f"tox.ini [testenv] deps: {line!r} (no such file)")
        elif line.startswith(("-", ".")):
            out.skipped.append(f"tox.ini [testenv] deps: {line!r} (option or path)")
        else:
            lines.append(line)
    out.add("tox.ini [testenv] deps", lines)


def _static_setup(path: Path) -> tuple[dict[str, Any], str | None]:
    """``setup()``'s literal keywords (names bound once to a literal at module level are
    followed), or ``({}, why not)``. The file is parsed, never run."""
    if not path.is_file():
        return {}, None
    try:
        module = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except SyntaxError as err:
        return {}, f"setup.py: not parsed ({err.msg}, line {err.lineno})"
    constants: dict[str, Any] = {}
    for node in module.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError):
                continue  # computed, not a constant: a keyword that names it is reported dynamic below
    wanted = ("install_requires", "tests_require", "extras_require", "name", "version")
    for call in ast.walk(module):
        if isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", "")) == "setup":
            found: dict[str, Any] = {}
            dynamic = []
            for kw in call.keywords:
                if kw.arg not in wanted:
                    continue
                if isinstance(kw.value, ast.Name) and kw.value.id in constants:
                    found[kw.arg] = constants[kw.value.id]
                    continue
                try:
                    found[kw.arg] = ast.literal_eval(kw.value)
                except (ValueError, TypeError, SyntaxError):
                    dynamic.append(kw.arg)
            why = f"setup.py: {', '.join(dynamic)} not literal (not read)" if dynamic else None
            return found, why
    return {}, "setup.py: no setup() call found"


def _project_identity(tree: Path, project: dict, cfg: configparser.ConfigParser,
                      setup_kw: dict[str, Any]) -> tuple[str | None, str | None]:
    info = _pkg_info(tree)
    name = project.get("name") or cfg.get("metadata", "name", fallback=None) \
        or setup_kw.get("name") or info.get("Name")
    version = info.get("Version") or (project.get("version") if isinstance(
        project.get("version"), str) else None)
    return (str(name) if isinstance(name, str) else None), version


def _pkg_info(tree: Path) -> dict[str, str]:
    """The sdist's ``PKG-INFO`` headers (name and version as built)."""
    path = tree / "PKG-INFO"
    if not path.is_file():
        return {}
    head = path.read_text(encoding="utf-8", errors="replace").split("\n\n", 1)[0]
    out: dict[str, str] = {}
    for line in head.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("Name", "Version"):
            out[key] = value.strip()
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise EnvBuildError("parse", f"{path.name}: not valid TOML ({err})") from err


def _read_cfg(path: Path) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    if path.is_file():
        try:
            cfg.read_string(path.read_text(encoding="utf-8", errors="replace"))
        except configparser.Error as err:
            raise EnvBuildError("parse", f"{path.name}: not a valid INI file ({err})") from err
    return cfg


def _cfg_list(value: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in value.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in (value or []) if isinstance(v, str)]


def _rel(tree: Path, path: Path) -> str:
    try:
        return str(path.relative_to(tree.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# resolve: pins from wheels only


def environment_key(pins: Sequence[str]) -> str:
    """The cache key of a resolved set: its sorted pins, this Python and this platform."""
    text = "\n".join([f"python {platform.python_version()} {sys.implementation.name}",
                      f"platform {sys.platform} {platform.machine()}", *sorted(pins)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def pins_from_report(report: dict[str, Any]) -> list[str]:
    """``name==version`` for every distribution pip's installation report would install."""
    pins = {f"{canonicalize_name(item['metadata']['name'])}=={item['metadata']['version']}"
            for item in report.get("install", [])}
    return sorted(pins)


def missing_wheels(pip_output: str) -> list[str]:
    """The requirements pip says it found no (binary) distribution for."""
    found = re.findall(r"(?:No matching distribution found for|Could not find a version that "
                       r"satisfies the requirement) ([^\s(]+)", pip_output)
    return sorted(set(found))


def resolve(requirements: Sequence[str], workdir: Path, find_links: Path | None = None,
            uploaded_prior_to: str | None = None) -> list[str]:
    """Pins for ``requirements`` from wheels only (this interpreter's markers); raises
    :class:`EnvBuildError` (stage ``resolve``) with pip's words and the wheel-less names.
    ``uploaded_prior_to`` (an ISO 8601 date) makes the answer independent of later uploads:
    the same declared set then resolves to the same pins, whenever it runs."""
    req_file, report_file = workdir / "requirements.in", workdir / "report.json"
    req_file.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
           "--only-binary", ":all:", "--quiet", "--report", str(report_file), "-r", str(req_file)]
    if find_links is not None:
        cmd += ["--find-links", str(find_links)]
    if uploaded_prior_to:
        cmd += ["--uploaded-prior-to", uploaded_prior_to]
    done = _pip(cmd)
    if done.returncode != 0:
        words = (done.stderr or done.stdout).strip()
        raise EnvBuildError("resolve", f"pip could not resolve from wheels: {words[-1500:]}",
                            missing_wheels=missing_wheels(words))
    return pins_from_report(json.loads(report_file.read_text(encoding="utf-8")))


def build_sdists_sandboxed(requirements: Sequence[str], wheelhouse: Path,
                           limits: sandbox.Limits) -> None:
    """``pip wheel`` of the whole requirement set inside the sandbox (network on for the
    download): whatever build backend an sdist brings runs there, not here."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    (wheelhouse / "requirements.in").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    argv = [sys.executable, "-m", "pip", "wheel", "--prefer-binary", "--quiet",
            "--wheel-dir", str(wheelhouse), "-r", str(wheelhouse / "requirements.in")]
    env = sandbox.default_env({k: v for k, v in os.environ.items()
                               if k.startswith("PIP_") and k != "PIP_FIND_LINKS"})
    result = sandbox.run_command(argv, cwd=wheelhouse, env=env,
                                 limits=_replace_limits(limits, network=True))
    if result.returncode != 0 or result.reason:
        words = (result.stderr + result.stdout).decode(errors="replace").strip()
        raise EnvBuildError("build-sdists", f"pip wheel in the sandbox failed "
                            f"({result.reason or f'exit {result.returncode}'}): {words[-1500:]}")


# ---------------------------------------------------------------------------------------------
# install: one venv per resolved set


def envs_root() -> Path:
    """``$CWM_CACHE/envs`` (beside the repository cache of :func:`cwm_forager.repos.cache_root`)."""
    return cache_root().parent / "envs"


def install(pins: Sequence[str], root: Path, find_links: Path | None = None) -> Path:
    """The virtual environment holding exactly ``pins`` (built once; a lock keeps concurrent
    builders of the same set from racing, a marker file tells a finished one)."""
    venv = root / environment_key(pins)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".cwm-complete").is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        done = _pip([sys.executable, "-m", "venv", "--without-pip", str(venv)])
        if done.returncode != 0:
            raise EnvBuildError("install", f"python -m venv {venv}: {done.stderr[-800:]}")
        (venv / "pins.txt").write_text("\n".join(pins) + "\n", encoding="utf-8")
        cmd = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
               "--no-deps", "--only-binary", ":all:", "--no-compile", "--quiet",
               "-r", str(venv / "pins.txt")]
        if find_links is not None:
            cmd += ["--find-links", str(find_links)]
        done = _pip(cmd)
        if done.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise EnvBuildError("install", f"pip install of the pins failed: "
                                f"{(done.stderr or done.stdout).strip()[-1500:]}")
        (venv / ".cwm-complete").write_text("\n".join(pins) + "\n", encoding="utf-8")
    return venv


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def write_project_metadata(tree: Path, dest: Path, name: str, version: str) -> Path:
    """A ``.dist-info`` for the (uninstalled) project: ``METADATA`` from ``PKG-INFO`` (or
    name and version), and entry points from the sdist's ``*.egg-info`` when it has them.
    Written once: ``dest`` is keyed by the tree, and processes preparing the same repository at
    once (a runner's workers) may be running tests with it, so it is never rewritten."""
    if dest.is_dir():
        return dest
    partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    dist = partial / f"{canonicalize_name(name).replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    info = tree / "PKG-INFO"
    metadata = info.read_text(encoding="utf-8", errors="replace") if info.is_file() else \
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    (dist / "METADATA").write_text(metadata, encoding="utf-8")
    (dist / "INSTALLER").write_text("cwm-envbuild\n", encoding="utf-8")
    for entry_points in sorted(tree.glob("*.egg-info/entry_points.txt")) + \
            sorted(tree.glob("src/*.egg-info/entry_points.txt")):
        shutil.copyfile(entry_points, dist / "entry_points.txt")
        break
    try:
        partial.rename(dest)
    except OSError:  # another process finished first: its copy is the same
        shutil.rmtree(partial, ignore_errors=True)
    return dest


# ---------------------------------------------------------------------------------------------
# the whole build, with its record


@dataclass
class BuildResult:
    """What building one repository's environment did (JSON-able via :meth:`to_json`)."""

    repository: str
    stage: str = "parse"
    ok: bool = False
    error: str | None = None
    declared: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)
    env_key: str | None = None
    env_path: str | None = None
    env_reused: bool = False
    resolution_reused: bool = False  # pins read from an earlier resolve (a fixed resolve date)
    missing_wheels: list[str] = field(default_factory=list)
    built_sdists: bool = False
    tests_passed: int = 0
    tests_failed: int = 0
    test_reason: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    advice: list[dict[str, Any]] = field(default_factory=list)  # prepare_with_advice's rounds

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BuiltEnvironment:
    """A finished install: the interpreter and the extra read-only import paths."""

    python: str
    venv: Path
    paths: tuple[str, ...]


def build(tree: Path, result: BuildResult, *, root: Path | None = None,
          build_sdists: bool = False, limits: sandbox.Limits | None = None,
          uploaded_prior_to: str | None = None, changes: Advice | None = None
          ) -> BuiltEnvironment:
    """Stages ``parse`` → ``resolve`` (→ ``build-sdists``) → ``install`` for the source tree
    ``tree``, recording each in ``result``; raises :class:`EnvBuildError` at the failing one
    (``result.stage`` and ``result.error`` set too). Running the suite is the caller's
    (:meth:`cwm_forager.env.RepoEnvironment.prepare`). ``changes`` amend what the tree
    declares (an advisor's, :func:`prepare_with_advice`)."""
    root = root or envs_root()
    try:
        return _build(Path(tree), result, root, build_sdists, limits or sandbox.Limits(
            wall_seconds=600, cpu_seconds=600, memory_mb=4096, output_bytes=4 << 20,
            processes=256), uploaded_prior_to, changes)
    except EnvBuildError as err:
        result.stage, result.error = err.stage, str(err)
        result.missing_wheels = sorted(err.details.get("missing_wheels", result.missing_wheels))
        raise


def _build(tree: Path, result: BuildResult, root: Path, build_sdists: bool,
           limits: sandbox.Limits, before: str | None, changes: Advice | None
           ) -> BuiltEnvironment:
    clock = time.monotonic()
    declared = declared_requirements(tree)
    if changes is not None:
        declared = changes.apply(declared)
    result.declared, result.sources = list(declared.requirements), list(declared.sources)
    result.skipped = list(declared.skipped)
    result.stage, clock = "resolve", _tick(result, "parse", clock)
    saved = _resolution_file(root, declared.requirements, before) if before else None
    wheelhouse = None
    if saved is not None and saved.is_file():
        pins, result.resolution_reused = json.loads(saved.read_text(encoding="utf-8")), True
    else:
        pins, wheelhouse, clock = _resolve_stage(declared, result, root, build_sdists, limits,
                                                 before, clock)
        if saved is not None and wheelhouse is None:  # a local wheelhouse's set is not reused
            saved.parent.mkdir(parents=True, exist_ok=True)
            partial = saved.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(pins), encoding="utf-8")
            partial.replace(saved)
    pins = _without_project(pins, declared.project, result.skipped)
    result.pins, result.env_key = pins, environment_key(pins)
    result.stage, clock = "install", _tick(result, "resolve", clock)
    result.env_reused = (root / result.env_key / ".cwm-complete").is_file()
    venv = install(pins, root, find_links=wheelhouse)
    result.env_path = str(venv)
    paths: tuple[str, ...] = ()
    if declared.project and declared.version:
        meta = root / "metadata" / hashlib.sha256(
            f"{tree.resolve()}\n{declared.project}\n{declared.version}".encode()).hexdigest()[:20]
        paths = (str(write_project_metadata(tree, meta, declared.project, declared.version)),)
    result.stage = "test"
    _tick(result, "install", clock)
    return BuiltEnvironment(str(venv / "bin" / "python"), venv, paths)


def _resolve_stage(declared: Declared, result: BuildResult, root: Path, build_sdists: bool,
                   limits: sandbox.Limits, before: str | None, clock: float
                   ) -> tuple[list[str], Path | None, float]:
    """Pins from wheels; where some have none and ``build_sdists``, built in the sandbox into a
    wheelhouse first. Returns the pins, the wheelhouse (or None) and the stage clock."""
    with tempfile.TemporaryDirectory(prefix="cwm-resolve-") as tmp:
        try:
            return resolve(declared.requirements, Path(tmp), uploaded_prior_to=before), None, clock
        except EnvBuildError as err:
            result.missing_wheels = err.details.get("missing_wheels", [])
            if not build_sdists:
                raise
        clock = _tick(result, "resolve", clock)
        result.stage, result.built_sdists = "build-sdists", True
        wheelhouse = root / "wheelhouse" / hashlib.sha256(
            "\n".join(declared.requirements).encode()).hexdigest()[:20]
        build_sdists_sandboxed(declared.requirements, wheelhouse, limits)
        result.stage, clock = "resolve", _tick(result, "build-sdists", clock)
        pins = resolve(declared.requirements, Path(tmp), find_links=wheelhouse,
                       uploaded_prior_to=before)
        return pins, wheelhouse, clock


def _resolution_file(root: Path, requirements: Sequence[str], before: str) -> Path:
    """Where the pins of a declared set resolved from uploads before ``before`` are kept: with
    the date fixed the answer does not change (the index and find-links settings are part of
    the key), so a later build of the same set skips pip's resolve."""
    settings = [f"{k}={os.environ.get(k, '')}" for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
                                                        "PIP_FIND_LINKS")]
    text = "\n".join([f"before {before}", *settings, *requirements])
    return root / "resolutions" / f"{environment_key([text])}.json"


def _without_project(pins: list[str], project: str | None, skipped: list[str]) -> list[str]:
    """The pins less the project itself (a dependency's dependency, as freezegun's
    python-dateutil is for python-dateutil): its tree is on the import path instead."""
    if not project:
        return pins
    own = [p for p in pins if p.split("==")[0] == canonicalize_name(project)]
    skipped += [f"pin {p}: the project itself, required by a dependency; its source tree is "
                "used instead" for p in own]
    return [p for p in pins if p not in own]


def _tick(result: BuildResult, stage: str, since: float) -> float:
    now = time.monotonic()
    result.seconds[stage] = round(result.seconds.get(stage, 0.0) + now - since, 2)
    return now


def _pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Runs pip (this project's own, a registry's ordinary client) on the host: only for
    resolving and installing wheels, which run no third-party code."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(cmd, 1, "", f"timed out after {err.timeout}s")


def _replace_limits(limits: sandbox.Limits, **changes: Any) -> sandbox.Limits:
    return sandbox.Limits(**{**asdict(limits), **changes})


# ---------------------------------------------------------------------------------------------
# the model-driven fallback: advice on the requirements where the deterministic build failed


@dataclass(frozen=True)
class Advice:
    """Requirements to ``add`` (PEP 508 strings) and distributions to ``drop`` (names)."""

    add: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    why: str = ""

    def __post_init__(self) -> None:
        for text in self.add:
            try:
                Requirement(text)
            except InvalidRequirement as err:
                raise EnvBuildError("advice", f"advice add {text!r}: not a requirement ({err})") from err

    def apply(self, declared: Declared) -> Declared:
        drop = {canonicalize_name(n) for n in self.drop}
        kept = [r for r in declared.requirements if canonicalize_name(Requirement(r).name) not in drop]
        added = [r for r in self.add if r not in kept]
        return Declared(declared.project, declared.version, tuple(kept + added),
                        (*declared.sources, f"advice: +{len(added)} -{len(self.drop)}"),
                        declared.skipped)

    def merged(self, earlier: Advice | None) -> Advice:
        """This round's advice on top of the earlier rounds'."""
        if earlier is None:
            return self
        drop = {canonicalize_name(n) for n in self.drop}
        add = [r for r in earlier.add if canonicalize_name(Requirement(r).name) not in drop]
        return Advice(tuple(dict.fromkeys([*add, *self.add])),
                      tuple(dict.fromkeys([*earlier.drop, *self.drop])), self.why)


def parse_advice(text: str) -> Advice:
    """The JSON object in a model's reply (a fenced block or bare), as :class:`Advice`."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        data = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError as err:
        raise EnvBuildError("advice", f"advisor reply: not JSON ({err}): {text[:300]!r}") from err
    if not isinstance(data, dict):
        raise EnvBuildError("advice", f"advisor reply: no JSON object: {text[:300]!r}")
    lists = {k: data.get(k, []) for k in ("add", "drop")}
    for key, value in lists.items():
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise EnvBuildError("advice", f"advisor reply: {key!r} must be a list of strings")
    return Advice(tuple(lists["add"]), tuple(lists["drop"]), str(data.get("why", ""))[:500])


ADVISOR_PROMPT = (
    "You fix the dependency list of a Python repository so that its test suite installs from "
    "PyPI wheels and runs under pytest. You get the build's failure and the repository's "
    "dependency files. Reply with one JSON object and nothing else: {\"add\": [PEP 508 "
    "requirement strings to install], \"drop\": [distribution names to leave out], \"why\": "
    "\"one sentence\"}. Add only what the failure shows is missing or wrong; an empty add and "
    "drop means you cannot help.")
DEPENDENCY_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "tox.ini", *REQUIREMENT_FILES,
                    *TEST_REQUIREMENT_FILES, *DEV_REQUIREMENT_FILES)


def failure_context(tree: Path, result: BuildResult, failure: str, file_chars: int = 3000) -> str:
    """What an advisor is shown: the stage, the failure's words, the declared requirements and
    the dependency files (each cut to ``file_chars``)."""
    parts = [f"Repository: {result.repository}", f"Stage reached: {result.stage}",
             f"Failure:\n{failure[-4000:]}", "Declared requirements: " + ", ".join(result.declared),
             "Sources: " + "; ".join(result.sources)]
    if result.missing_wheels:
        parts.append("No wheel for: " + ", ".join(result.missing_wheels))
    for rel in DEPENDENCY_FILES:
        if (Path(tree) / rel).is_file():
            text = (Path(tree) / rel).read_text(encoding="utf-8", errors="replace")
            parts.append(f"--- {rel} ---\n{text[:file_chars]}")
    return "\n\n".join(parts)


class Advisor(Protocol):
    def advise(self, context: str) -> Advice: ...


class OpenAIAdvisor:
    """Advice from an OpenAI-compatible chat endpoint (vLLM, SGLang, ``cwm serve``), at
    temperature 0 so a build is repeatable with the same model."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 120.0) -> None:
        from openai import OpenAI  # noqa: PLC0415 (a heavy client only this fallback needs)

        self.client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout,
                             max_retries=1)
        self.model = model

    def advise(self, context: str) -> Advice:
        response = self.client.chat.completions.create(
            model=self.model, temperature=0.0,
            messages=[{"role": "system", "content": ADVISOR_PROMPT},
                      {"role": "user", "content": context}])
        return parse_advice(response.choices[0].message.content or "")


def prepare_with_advice(env: RepoEnvironment, advisor: Advisor, rounds: int = 2
                        ) -> RepoEnvironment:
    """``env.prepare()`` with a built environment; after a failure (a build stage, or no test
    passing) ask ``advisor`` and build again, at most ``rounds`` times. Empty advice ends it.
    Raises the last :class:`RepositoryError` when no round succeeds."""
    env.dependencies = True
    history: list[dict[str, Any]] = []
    for attempt in range(rounds + 1):
        try:
            env.prepare()
        except RepositoryError as err:
            if env.build is None or attempt == rounds:
                _record(env, history)
                raise
            advice = advisor.advise(failure_context(fetch(env.source), env.build, str(err)))
            history.append({"after_stage": env.build.stage, **asdict(advice)})
            if not advice.add and not advice.drop:
                _record(env, history)
                raise
            env.requirement_changes = advice.merged(env.requirement_changes)
            env.base = None  # prepare() again, from a fresh copy of the source
            continue
        _record(env, history)
        return env
    raise AssertionError("unreachable")


def _record(env: RepoEnvironment, history: list[dict[str, Any]]) -> None:
    if env.build is not None:
        env.build.advice = history
