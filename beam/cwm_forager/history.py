"""Issue-fix tasks from a repository's history (the R2E-Gym / SWE-smith recipe).

A commit that changes non-test code and comes with tests is a candidate (:func:`fix_commits`).
Its environment is the commit's own tree, prepared like any repository (suite run once with
coverage). For each function the commit changed, the task puts that function back as it was
before the commit (a function the commit added is removed): the agent's starting state
(:func:`reverted_functions`). The task is validated by execution exactly as a mutate-fix task
(:func:`cwm_forager.tasks.validate_task`): the tests that cover the function must pass on the
commit's tree (they are the suite's) and some must fail on the reverted one, and at least one of
those failing tests must live in a test file the commit itself changed, so the task is the
commit's own fail-to-pass evidence. The commit message is the issue when it says enough
(:func:`issue_text`); otherwise a model can write one from the failing tests' output
(:func:`write_issue`; the trajectories step does it with an ``openai`` policy's model), else the
agent reads only the failing tests.

:func:`release_repository` builds a git history from successive released source distributions of
a PyPI project (one commit per release), so real projects' histories can be mined without a git
host; any local or cloned git repository works the same way.

The trajectories step (:mod:`cwm_beam.trajectories`, ``spec.data.trajectories.issueFix``) mines
each history source with :func:`open_history` and :func:`fix_commits`, prepares each fix commit's
environment from a spec any process can fetch again (:func:`commit_environment`: the release's own
PyPI pin, or the git repository at the commit), proposes its tasks (:func:`commit_tasks`) and
validates them with :func:`cwm_forager.tasks.validate_task` and :func:`commit_evidence`.
:func:`mine_repository` does the same in one process, for a local repository.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cwm_exec import sandbox
from cwm_forager.env import RepoEnvironment
from cwm_forager.mutations import iter_functions
from cwm_forager.pytest_plugin import is_test_file
from cwm_forager.repos import RepositoryError, RepoSource, copy_tree, fetch
from cwm_forager.rollout import Policy, Trajectory, run_episode
from cwm_forager.tasks import MAX_TESTS_PER_TASK, Task, validate_task

FAMILY = "issue_fix"
MIN_ISSUE_WORDS = 8      # a shorter message ("Release 1.0", "fix") says too little
RELEASE = "{project} {version}"  # a release commit's message (release_repository)
NOT_SOURCE = ("setup.py", "conftest.py", "noxfile.py", "_version.py")
_GIT_ENV = {"GIT_AUTHOR_NAME": "cwm", "GIT_AUTHOR_EMAIL": "cwm@localhost",
            "GIT_COMMITTER_NAME": "cwm", "GIT_COMMITTER_EMAIL": "cwm@localhost",
            "GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z"}


@dataclass(frozen=True)
class FixCommit:
    """A commit that changes source files and test files (paths relative to the root)."""

    sha: str
    parent: str
    message: str
    sources: tuple[str, ...]
    tests: tuple[str, ...]


@dataclass
class HistoryReport:
    """What mining one repository found: the numbers the data set's manifest reports."""

    repo: str
    commits_scanned: int = 0
    fix_commits: int = 0
    tasks_found: int = 0       # reverted functions tried
    validated: int = 0
    solved: int | None = None  # by the policy given to mine_repository, if one was
    rejected: dict[str, int] = field(default_factory=dict)
    tasks: list[Task] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        key = reason.split(":", 1)[0]
        self.rejected[key] = self.rejected.get(key, 0) + 1

    def summary(self) -> dict[str, object]:
        return {"repo": self.repo, "commits_scanned": self.commits_scanned,
                "fix_commits": self.fix_commits, "tasks_found": self.tasks_found,
                "validated": self.validated, "solved": self.solved,
                "rejected": dict(sorted(self.rejected.items()))}


# ------------------------------------------------------------------------------ git


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    if done.returncode != 0:
        raise RepositoryError(f"git {' '.join(args[:2])} in {repo}: {done.stderr.strip()[-400:]}")
    return done.stdout


def release_repository(project: str, versions: Sequence[str], dest: Path) -> Path:
    """A git repository at ``dest`` with one commit per released sdist of ``project`` (fetched
    once into the repository cache), oldest first, each commit the whole release tree."""
    if len(versions) < 2:
        raise ValueError(f"release history of {project}: give at least two versions")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    git(dest, "init", "--quiet", "--initial-branch=main")
    for version in versions:
        tree = fetch(RepoSource(pypi=f"{project}=={version}"))
        for child in dest.iterdir():
            if child.name != ".git":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        for child in tree.iterdir():
            target = dest / child.name
            copy_tree(child, target) if child.is_dir() else shutil.copy2(child, target)
        git(dest, "add", "--all")
        git(dest, "commit", "--quiet", "--allow-empty", "-m",
            RELEASE.format(project=project, version=version), env=_GIT_ENV)
    return dest


def fix_commits(repo: Path, revisions: str = "HEAD", max_commits: int | None = None
                ) -> tuple[list[FixCommit], int]:
    """The candidate commits among the newest ``max_commits`` of ``revisions`` (a git revision
    range, first-parent line), oldest first, and how many commits with a parent were scanned."""
    limit = ["--max-count", str(max_commits)] if max_commits else []
    lines = git(repo, "log", "--first-parent", "--reverse", "--format=%H %P", *limit, revisions,
                "--").splitlines()
    found, scanned = [], 0
    for line in lines:
        sha, *parents = line.split()
        if not parents:
            continue  # the root commit: nothing before it to fix
        scanned += 1
        names = git(repo, "diff", "--name-only", "--no-renames", parents[0], sha, "--",
                    "*.py").split("\n")
        names = [n for n in names if n]
        tests = tuple(n for n in names if is_test_file(n))
        sources = tuple(n for n in names if not is_test_file(n)
                        and Path(n).name not in NOT_SOURCE and "docs" not in Path(n).parts)
        if sources and tests:
            message = git(repo, "log", "-1", "--format=%B", sha).strip()
            found.append(FixCommit(sha, parents[0], message, sources, tests))
    return found, scanned


def source_name(source: Mapping[str, object]) -> str:
    """The name a history source's numbers go under: the PyPI project, or the git repository's."""
    if source.get("pypi"):
        return str(source["pypi"])
    return RepoSource(git=str(source["git"])).name


def _git_location(url: str) -> str:
    """A git URL as given, a local repository's path made absolute (any process can clone it)."""
    return str(Path(url).resolve()) if Path(url).exists() else url


def open_history(source: Mapping[str, object], dest: Path) -> tuple[Path, str]:
    """The git repository of a history source (``HistorySource`` of the API, as a dict) at
    ``dest`` and the revision range to mine: a PyPI project's releases committed one by one
    (:func:`release_repository`), or a bare clone of the git repository."""
    if source.get("pypi"):
        versions = [str(v) for v in source["versions"]]  # type: ignore[attr-defined]
        return release_repository(str(source["pypi"]), versions, dest), "HEAD"
    url = _git_location(str(source["git"]))
    shutil.rmtree(dest, ignore_errors=True)
    done = subprocess.run(["git", "clone", "--quiet", "--bare", url, str(dest)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RepositoryError(f"history git {url!r}: clone failed: {done.stderr.strip()[-400:]}")
    for key in ("since", "until"):
        ref = source.get(key)
        if ref and subprocess.run(["git", "-C", str(dest), "rev-parse", "--verify", "--quiet",
                                   f"{ref}^{{commit}}"], capture_output=True).returncode != 0:
            raise RepositoryError(f"history git {url!r}: {key} {ref!r} is not a commit there")
    until = str(source.get("until") or "HEAD")
    return dest, f"{source['since']}..{until}" if source.get("since") else until


def commit_environment(source: Mapping[str, object], commit: FixCommit) -> dict[str, str | bool]:
    """The repository spec of a fix commit's tree, one that any process (a worker, an RL or
    evaluation pod) can fetch again: the release's own PyPI pin, or the git repository at the
    commit; with the source's ``dependencies``, built with its declared dependencies
    (:data:`cwm_forager.env.BUILD_OPTIONS`)."""
    built: dict[str, str | bool] = {"dependencies": True} if source.get("dependencies") else {}
    if source.get("pypi"):
        project = str(source["pypi"])
        version = commit.message.rsplit(" ", 1)[-1]
        if commit.message != RELEASE.format(project=project, version=version):
            raise RepositoryError(f"history of {project}: commit {commit.sha[:10]} "
                                  f"({commit.message!r}) is not a release commit")
        return {"pypi": f"{project}=={version}", **built}
    return {"git": _git_location(str(source["git"])), "ref": commit.sha, **built}


def file_at(repo: Path, sha: str, path: str) -> str | None:
    """A file's text at a commit, or None where it does not exist (or is not text)."""
    try:
        return git(repo, "show", f"{sha}:{path}")
    except RepositoryError:
        return None


def export_tree(repo: Path, sha: str, dest: Path) -> Path:
    """The commit's tree as a plain folder (no history: the agent must not read the fix)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", sha],
                             capture_output=True, check=True, timeout=300).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=300)
    return dest


# ------------------------------------------------------------------------------ pure parts


def issue_text(message: str, min_words: int = MIN_ISSUE_WORDS) -> str:
    """The commit message as the task's issue, or "" when it says too little to act on."""
    words = re.findall(r"[A-Za-z]{2,}", message)
    return message.strip() if len(words) >= min_words else ""


ISSUE_SYSTEM = ("You write the issue a user of a Python library would file. From the failing "
                "tests and their output, write a short report: a title line, then what goes "
                "wrong and what was expected. Describe the behaviour only: do not guess at the "
                "cause or the fix, and do not mention tests.")
_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)


def issue_request(task: Task, test_output: str, max_chars: int = 6000) -> list[dict[str, str]]:
    """The chat messages asking a model to write a task's issue from its failing tests (their
    ids and the end of their output: the agent sees the same), never from the fix."""
    failing = "\n".join(f"  {t}" for t in task.failing_tests[:20])
    return [{"role": "system", "content": ISSUE_SYSTEM},
            {"role": "user", "content": f"Repository: {task.repo}\nFailing tests:\n{failing}\n\n"
                                        f"Their output (the end):\n{test_output[-max_chars:]}"}]


def issue_from_reply(reply: str | None) -> str:
    """The model's issue (its reasoning, if any, left out), or "" when it says too little, by
    the rule a commit message is held to (:func:`issue_text`)."""
    return issue_text(_THINKING.sub("", reply or "").strip())


def write_issue(env: RepoEnvironment, task: Task,
                chat: Callable[[list[dict[str, str]]], str | None]) -> Task:
    """The task with an issue written by ``chat`` (a model) from its failing tests' output, run
    on a fresh copy of the task's starting state; unchanged if the reply says too little."""
    workdir = env.fresh_task_copy(task)
    try:
        report = env.run_tests(workdir, task.failing_tests)
    finally:
        env.discard(workdir)
    issue = issue_from_reply(chat(issue_request(task, report.output)))
    return replace(task, issue=issue) if issue else task


def _spans(source: str) -> dict[str, tuple[int, int]]:
    """Qualified function name → (first line with decorators, last line), 1-based."""
    spans = {}
    for name, node in iter_functions(ast.parse(source)):
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        spans[name] = (first, node.end_lineno or node.lineno)
    return spans


def reverted_functions(before: str, after: str) -> Iterator[tuple[str, int, str]]:
    """For each function the change touched (outermost only), ``after`` with that one function
    as it was ``before`` (removed if it is new): ``(qualified name, line, source)``. Sources that
    no longer parse are left out."""
    try:
        old, new = _spans(before), _spans(after)
    except SyntaxError:
        return
    old_lines, new_lines = before.splitlines(keepends=True), after.splitlines(keepends=True)
    changed = [name for name, (lo, hi) in new.items()
               if name not in old or new_lines[lo - 1:hi] != old_lines[old[name][0] - 1:
                                                                    old[name][1]]]
    outer = [n for n in changed
             if not any(n.startswith(o + ".") for o in changed if o != n)]
    for name in outer:
        lo, hi = new[name]
        body = old_lines[old[name][0] - 1:old[name][1]] if name in old else []
        source = "".join(new_lines[:lo - 1] + body + new_lines[hi:])
        try:
            ast.parse(source)
        except SyntaxError:
            continue
        yield name, lo, source


# ------------------------------------------------------------------------------ mining


def commit_tasks(env: RepoEnvironment, repo: Path, commit: FixCommit) -> Iterator[Task]:
    """Unvalidated issue-fix tasks of one fix commit: each covered function it changed put back
    as it was (``env`` is the commit's tree, prepared; ``repo`` holds the parent)."""
    covering = env.covering_tests()
    issue = issue_text(commit.message)
    headline = commit.message.strip().splitlines()[0] if commit.message.strip() else ""
    for path in commit.sources:
        before, after = file_at(repo, commit.parent, path), env.read(path)
        if before is None:
            continue  # a new module: reverting it is deleting it, not a fix to find
        for name, line, reverted in reverted_functions(before, after):
            tests = covering.get((path, name), [])
            if not tests:
                continue
            digest = hashlib.sha1(f"{commit.sha}|{path}|{name}".encode()).hexdigest()[:10]
            yield Task(task_id=f"{env.name}/{FAMILY}/{digest}", repo=env.name, family=FAMILY,
                       path=path, function=name, line=line,
                       description=f"commit {commit.sha[:10]}: {headline}"[:200],
                       original=after, mutated=reverted,
                       tests=tuple(tests[:MAX_TESTS_PER_TASK]), issue=issue)


def commit_evidence(task: Task, commit_tests: Sequence[str]) -> str | None:
    """Why a validated task is not the commit's own fail-to-pass evidence (no failing test lives
    in a test file the commit changed), or None when it is."""
    if any(t.split("::", 1)[0] in commit_tests for t in task.failing_tests):
        return None
    return "no failing test is one the commit changed"


def mine_repository(repo: Path, *, name: str | None = None,
                    limits: sandbox.Limits | None = None, max_commits: int | None = None,
                    workroot: Path | None = None, policy: Policy | None = None,
                    max_turns: int = 32) -> HistoryReport:
    """Validated issue-fix tasks from ``repo``'s history (the newest ``max_commits`` commits
    scanned; see the module docstring); with a ``policy``, one episode per validated task in its
    environment, and how many it solved."""
    name = name or repo.resolve().name
    report = HistoryReport(repo=name, solved=0 if policy is not None else None)
    commits, report.commits_scanned = fix_commits(repo, max_commits=max_commits)
    report.fix_commits = len(commits)
    root = Path(tempfile.mkdtemp(prefix="cwm-history-", dir=workroot))
    try:
        for commit in commits:
            tree = export_tree(repo, commit.sha, root / f"{name}@{commit.sha[:10]}")
            env = RepoEnvironment(RepoSource(path=str(tree)),
                                  limits=limits or sandbox.Limits(), workroot=root / "envs")
            try:
                env.prepare()
            except RepositoryError as err:
                report.reject(f"environment: {err}")
                continue
            try:
                for task in commit_tasks(env, repo, commit):
                    report.tasks_found += 1
                    if _validate(env, task, commit, report) and policy is not None:
                        _solve(env, report.tasks[-1], policy, max_turns, report)
            finally:
                env.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _validate(env: RepoEnvironment, task: Task, commit: FixCommit, report: HistoryReport) -> bool:
    result = validate_task(env, task)
    if isinstance(result, str):
        report.reject(result)
        return False
    reason = commit_evidence(result, commit.tests)
    if reason is not None:
        report.reject(reason)
        return False
    report.tasks.append(result)  # with its failing tests and gold patch (the commit's change)
    report.validated += 1
    return True


def _solve(env: RepoEnvironment, task: Task, policy: Policy, max_turns: int,
           report: HistoryReport) -> None:
    trajectory = run_episode(env, task, policy, max_turns=max_turns)
    report.trajectories.append(trajectory)
    report.solved = (report.solved or 0) + int(trajectory.success)
