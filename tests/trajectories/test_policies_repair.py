"""The search policy repairs removals in real sandboxed episodes on the fixture repositories:
a lost import, parameter, return and statement, each fixed through the repair helper's
suggestion (an ``edit`` action), graded by the task's tests."""

from __future__ import annotations

import json

import pytest

from cwm_forager.env import RepoEnvironment
from cwm_forager.mutations import find_mutations
from cwm_forager.policies import SearchRepairPolicy
from cwm_forager.rollout import run_episode
from cwm_forager.tasks import Task, task_from_mutation, validate_task

from .conftest import FAST_LIMITS


@pytest.fixture(scope="module")
def textkit_env(tmp_path_factory):
    env = RepoEnvironment({"path": "textkit"}, limits=FAST_LIMITS,
                          workroot=tmp_path_factory.mktemp("textkit-env"))
    env.prepare()
    yield env
    env.close()


def removal_task(env: RepoEnvironment, path: str, description: str) -> Task:
    mutation = next(m for m in find_mutations(env.read(path), path)
                    if m.description == description)
    task = validate_task(env, task_from_mutation(
        env, mutation, env.covering_tests()[(path, mutation.function)]))
    assert isinstance(task, Task), task
    return task


CASES = [  # (repository, file, mutation, a line the fixing edit adds)
    ("calc", "calc/stats.py", "removed import of 'clamp' (line 3)", "from calc.arith import clamp"),
    ("calc", "calc/arith.py", "removed parameter 'offset'", "def scale(values, factor, offset"),
    ("calc", "calc/stats.py", "removed 'return'", "    return divide(sum(squares), len(values))"),
    ("calc", "calc/arith.py", "removed statement at line 13", "        return low"),
    ("textkit", "textkit/words.py", "removed statement at line 16", "    words = text.split()"),
]


@pytest.mark.parametrize(("repo", "path", "description", "added"), CASES,
                         ids=[c[2].split(" (")[0] for c in CASES])
def test_the_search_policy_repairs_a_removal_from_the_evidence(
        repo, path, description, added, calc_env, textkit_env):
    env = calc_env if repo == "calc" else textkit_env
    task = removal_task(env, path, description)
    trajectory = run_episode(env, task, SearchRepairPolicy(), max_turns=30, action_timeout=20)
    meta = trajectory.meta
    assert meta["success"] and meta["stop"] == "submitted", (meta, trajectory.actions())
    actions = trajectory.actions()
    assert any(name == "bash" and "cwm_forager.repair" in args for name, args in actions)
    edits = [json.loads(args) for name, args in actions if name == "edit"]
    assert added in edits[-1]["replace"]  # the edit that passed is the helper's suggestion
    assert f"+{added}" in meta["patch"]
