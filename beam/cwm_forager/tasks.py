"""Mutate-fix tasks: a synthetic bug in a test-covered function, kept only if tests then fail.

Three steps, separable so the Beam pipeline can spread validation over workers:

1. :func:`candidate_tasks` (pure given the prepared environment): mutations of the functions the
   suite covers, shuffled with the seed and interleaved across families;
2. :func:`validate_task`: run the tests covering the function on a fresh mutated copy; the task
   is kept if at least one fails (the original passes them all: they are the environment's
   suite) and no limit was hit; the failing tests and the gold patch (the reverse diff) are
   recorded;
3. :func:`select_tasks`: at most ``n`` validated tasks, balanced across families.

:func:`synthesize_tasks` runs all three in-process.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from cwm_forager.env import RepoEnvironment
from cwm_forager.mutations import FAMILIES, Mutation, apply_edits, find_mutations, unified_diff

MAX_TESTS_PER_TASK = 200  # a function covered by more tests is graded on a seeded sample


@dataclass(frozen=True)
class Task:
    """One mutate-fix task. ``tests`` grade it; ``failing_tests`` fail on the mutated code."""

    task_id: str
    repo: str
    family: str
    path: str
    function: str
    line: int
    description: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    failing_tests: tuple[str, ...] = ()
    gold_patch: str = ""
    issue: str = ""  # an issue-fix task's report in words (its commit message), if it says enough

    def statement(self, root: str = "/repo") -> str:
        """The task as the agent reads it: the issue if there is one, which tests fail, and what
        is expected."""
        shown = self.failing_tests[:20]
        more = len(self.failing_tests) - len(shown)
        lines = [f"The repository at {root} ({self.repo}) has a bug: these tests fail.", ""]
        if self.issue:
            lines = [f"The repository at {root} ({self.repo}) has an issue:", "",
                     *self.issue.strip().splitlines(), "", "These tests fail:", ""]
        lines += [f"  {t}" for t in shown]
        if more > 0:
            lines.append(f"  ... and {more} more")
        lines += ["", "Find the bug in the source code (do not modify the tests) and fix it. "
                  "Run tests with `python -m pytest -q <test id>`. "
                  "Call submit when you are done."]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tests"], data["failing_tests"] = list(self.tests), list(self.failing_tests)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Task:
        try:
            return cls(**{**data, "tests": tuple(data["tests"]),
                          "failing_tests": tuple(data.get("failing_tests", ()))})
        except (KeyError, TypeError) as err:
            raise ValueError(f"task record {data.get('task_id', '?')}: malformed ({err})") from None


def task_from_mutation(env: RepoEnvironment, mutation: Mutation, tests: Sequence[str]) -> Task:
    original = env.read(mutation.path)
    mutated = apply_edits(original, mutation.edits)
    digest = hashlib.sha1(f"{env.name}|{mutation.key}".encode()).hexdigest()[:10]
    return Task(task_id=f"{env.name}/{mutation.family}/{digest}", repo=env.name,
                family=mutation.family, path=mutation.path, function=mutation.function,
                line=mutation.line, description=mutation.description, original=original,
                mutated=mutated, tests=tuple(tests))


def candidate_tasks(env: RepoEnvironment, families: Sequence[str] = FAMILIES,
                    count: int = 100, seed: int = 0) -> list[Task]:
    """Up to ``count`` unvalidated tasks, interleaved across families (round robin over the
    seeded shuffle of each family's mutations, at most two per function and family)."""
    rng = random.Random(seed)
    covering = env.covering_tests()
    by_file: dict[str, set[str]] = defaultdict(set)
    for path, func in covering:
        by_file[path].add(func)
    pools: dict[str, list[Mutation]] = {f: [] for f in families}
    for path in sorted(by_file):
        try:
            mutations = find_mutations(env.read(path), path, families, by_file[path])
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this Python cannot parse: not mutated
        for mutation in mutations:
            pools[mutation.family].append(mutation)
    for family in families:
        rng.shuffle(pools[family])
    out: list[Task] = []
    per_function: dict[tuple[str, str, str], int] = defaultdict(int)
    cursors = dict.fromkeys(families, 0)
    while len(out) < count and any(cursors[f] < len(pools[f]) for f in families):
        for family in families:
            while cursors[family] < len(pools[family]):
                mutation = pools[family][cursors[family]]
                cursors[family] += 1
                key = (mutation.family, mutation.path, mutation.function)
                if per_function[key] >= 2:
                    continue
                per_function[key] += 1
                tests = covering[(mutation.path, mutation.function)]
                if len(tests) > MAX_TESTS_PER_TASK:
                    tests = sorted(random.Random(mutation.key).sample(tests, MAX_TESTS_PER_TASK))
                out.append(task_from_mutation(env, mutation, tests))
                break
            if len(out) >= count:
                break
    return out


def validate_task(env: RepoEnvironment, task: Task) -> Task | str:
    """The task with its failing tests and gold patch, or the reason it was rejected."""
    workdir = env.fresh_task_copy(task)
    try:
        report = env.run_tests(workdir, task.tests)
    finally:
        env.discard(workdir)
    if report.reason is not None:
        return f"mutated run hit a limit: {report.reason}"
    failing = report.not_passing(task.tests)
    if not failing:
        return "no test fails on the mutated code"
    gold = unified_diff(task.mutated, task.original, task.path)
    return replace(task, failing_tests=tuple(failing), gold_patch=gold)


def select_tasks(tasks: Iterable[Task], families: Sequence[str], n: int) -> list[Task]:
    """At most ``n`` tasks, families taking turns (a family with too few leaves room to the
    others), in a stable order."""
    pools: dict[str, list[Task]] = {f: [] for f in families}
    for task in sorted(tasks, key=lambda t: t.task_id):
        pools.setdefault(task.family, []).append(task)
    out: list[Task] = []
    while len(out) < n and any(pools.values()):
        for family in list(pools):
            if pools[family] and len(out) < n:
                out.append(pools[family].pop(0))
    return out


def synthesize_tasks(repo: RepoEnvironment, families: Sequence[str] = FAMILIES, n: int = 20,
                     seed: int = 0, max_candidates: int | None = None,
                     stats: dict[str, int] | None = None) -> list[Task]:
    """``n`` validated tasks (fewer if the repository runs out of candidates), balanced across
    families. Candidates are validated family by family in round-robin order until each family
    has its share, so the cost is about ``n`` validations plus the rejects."""
    repo.prepare()
    stats = stats if stats is not None else {}
    candidates = candidate_tasks(repo, families, max_candidates or 6 * n, seed)
    share = {f: n // len(families) + (1 if i < n % len(families) else 0)
             for i, f in enumerate(families)}
    kept: list[Task] = []
    tried: set[str] = set()
    for balanced in (True, False):  # second pass: families that ran short leave room to others
        for task in candidates:
            if len(kept) >= n:
                break
            if task.task_id in tried or (balanced and share.get(task.family, 0) <= 0):
                continue
            tried.add(task.task_id)
            result = validate_task(repo, task)
            if isinstance(result, str):
                key = "rejected: " + result.split(":")[0]
                stats[key] = stats.get(key, 0) + 1
                continue
            kept.append(result)
            share[task.family] = share.get(task.family, 0) - 1
    stats["validated"] = len(kept)
    stats["candidates"] = len(candidates)
    return select_tasks(kept, families, n)
