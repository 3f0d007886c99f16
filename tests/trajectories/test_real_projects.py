"""A real open-source project from its PyPI source distribution (downloaded once with pip into
the cache, then reused): prepared in the sandbox, tasks in every family, one episode."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cwm_forager.env import RepoEnvironment
from cwm_forager.mutations import FAMILIES
from cwm_forager.policies import SearchRepairPolicy
from cwm_forager.rollout import run_episode
from cwm_forager.tasks import synthesize_tasks

from .conftest import FAST_LIMITS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toolz(tmp_path_factory):
    # a short wall clock: a mutation that loops forever is rejected quickly
    env = RepoEnvironment({"pypi": "toolz==1.0.0"}, limits=replace(FAST_LIMITS, wall_seconds=6),
                          workroot=tmp_path_factory.mktemp("toolz"))
    env.prepare()
    yield env
    env.close()


def test_toolz_sdist_tasks_in_every_family_and_an_episode(toolz):
    assert len(toolz.suite) >= 150 and toolz.baseline.reason is None
    assert "toolz/itertoolz.py" in toolz.source_files()
    tasks = synthesize_tasks(toolz, n=5, seed=0)
    assert sorted(t.family for t in tasks) == sorted(FAMILIES)
    for task in tasks:
        assert task.failing_tests and task.gold_patch.startswith("--- a/toolz/")
    swap = next(t for t in tasks if t.family == "variable_swap")
    trajectory = run_episode(toolz, swap, SearchRepairPolicy(), max_turns=30, action_timeout=20)
    assert trajectory.meta["turns"] <= 30 and trajectory.observations()
