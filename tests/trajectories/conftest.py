"""Shared, session-scoped fixtures: preparing an environment runs its test suite in the sandbox,
so each fixture repository is prepared once per session and tasks are synthesised once."""

from __future__ import annotations

import pytest

from cwm_exec.sandbox import Limits
from cwm_forager.env import RepoEnvironment
from cwm_forager.tasks import synthesize_tasks

FAST_LIMITS = Limits(wall_seconds=20, cpu_seconds=20, memory_mb=1024, output_bytes=200_000,
                     processes=64)


@pytest.fixture(scope="session")
def calc_env(tmp_path_factory):
    env = RepoEnvironment({"path": "calc"}, limits=FAST_LIMITS,
                          workroot=tmp_path_factory.mktemp("calc-env"))
    env.prepare()
    yield env
    env.close()


@pytest.fixture(scope="session")
def calc_tasks(calc_env):
    return synthesize_tasks(calc_env, n=10, seed=0)


def task_of(tasks, family):
    return next(t for t in tasks if t.family == family)
