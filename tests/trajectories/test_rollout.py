"""Episodes on the calc fixture repository: tasks, the search policy, grading, replay."""

from __future__ import annotations

import json
import subprocess

from cwm_forager.mutations import FAMILIES
from cwm_forager.policies import SearchRepairPolicy
from cwm_forager.records import check_record
from cwm_forager.rollout import Trajectory, episode_id, replay_actions, run_episode
from cwm_forager.tasks import Task, validate_task

from .conftest import task_of


def test_synthesis_covers_every_family_with_failing_tests_and_gold_patch(calc_env, calc_tasks, tmp_path):
    assert len(calc_tasks) == 10
    assert {t.family for t in calc_tasks} == set(FAMILIES)
    for task in calc_tasks:
        assert task.failing_tests and set(task.failing_tests) <= set(task.tests) <= set(calc_env.suite)
        # the gold patch turns the mutated file back into the original, with git apply
        work = tmp_path / task.task_id.replace("/", "_")
        (work / task.path).parent.mkdir(parents=True)
        (work / task.path).write_text(task.mutated)
        subprocess.run(["git", "apply", "-"], input=task.gold_patch, text=True, cwd=work, check=True)
        assert (work / task.path).read_text() == task.original


def test_a_mutation_no_test_notices_is_rejected(calc_env, calc_tasks):
    task = calc_tasks[0]
    harmless = Task(**{**task.to_json(), "mutated": task.original + "\n# comment\n",
                       "tests": tuple(task.tests), "failing_tests": ()})
    assert validate_task(calc_env, harmless) == "no test fails on the mutated code"


def test_search_policy_fixes_an_operator_bug_and_replay_reproduces_observations(calc_env, calc_tasks):
    task = task_of(calc_tasks, "operator_replacement")
    trajectory = run_episode(calc_env, task, SearchRepairPolicy(), max_turns=30, action_timeout=20)
    meta = trajectory.meta
    assert meta["success"] and meta["submitted"] and meta["stop"] == "submitted", meta
    assert meta["turns"] <= 30 and meta["tokens"]["total"] > 0
    assert meta["patch"] and meta["family"] == "operator_replacement"
    record = check_record(trajectory.to_record())
    assert [m["role"] for m in record["messages"][:3]] == ["system", "user", "assistant"]
    names = [name for name, _ in trajectory.actions()]
    assert names[0] == "bash" and "edit" in names and names[-1] == "submit"
    # Deterministic environment: the same actions on a fresh copy give the same observations.
    assert replay_actions(calc_env, task, Trajectory.from_record(record)) == trajectory.observations()


def test_failed_episodes_are_kept_with_their_reason(calc_env, calc_tasks):
    task = task_of(calc_tasks, "body_removal")
    trajectory = run_episode(calc_env, task, SearchRepairPolicy(), max_turns=3, action_timeout=20)
    assert not trajectory.success
    assert trajectory.meta["stop"] in ("max_turns", "submitted") and trajectory.meta["turns"] <= 3
    assert trajectory.meta["still_failing"]
    check_record(trajectory.to_record())


def test_an_episode_run_twice_is_the_same_record(calc_env, calc_tasks):
    """The record is a function of task, policy and seed (the data set of two runs of one spec
    is the same bytes): its id is derived, its wall time kept beside it, not in it."""
    task = task_of(calc_tasks, "operator_replacement")
    first, second = (run_episode(calc_env, task, SearchRepairPolicy(), max_turns=30,
                                 action_timeout=20) for _ in range(2))
    assert json.dumps(first.to_record(), sort_keys=True) == json.dumps(second.to_record(),
                                                                       sort_keys=True)
    assert first.seconds > 0 and "seconds" not in first.meta
    other = run_episode(calc_env, task, SearchRepairPolicy(), max_turns=1, seed=1)
    assert other.meta["episode_id"] == episode_id(task, "search", 1) != first.meta["episode_id"]
    assert episode_id(task, "search", 0) == first.meta["episode_id"]
    assert episode_id(calc_tasks[1], "search", 0) != first.meta["episode_id"]


class _Broken:
    name = "broken"

    def act(self, messages, tools):
        raise ConnectionError("endpoint unreachable")


def test_a_policy_failure_is_recorded_not_raised(calc_env, calc_tasks):
    trajectory = run_episode(calc_env, calc_tasks[0], _Broken(), max_turns=5)
    assert trajectory.meta["stop"] == "policy_error"
    assert "endpoint unreachable" in trajectory.meta["error"] and not trajectory.success
