"""The Beam entry point: configuration parsing (fast) and a whole run on a fixture repository
(slow, integration)."""

from __future__ import annotations

import json

import pytest

from cwm_beam import trajectories
from cwm_forager.records import check_record
from cwm_spec import artifacts


def step_config(tmp_path, **spec):
    config = {"apiVersion": "cwm.dev/v1alpha1", "pipeline": "t", "step": "trajectories",
              "kind": "beam", "seed": 3, "spec": spec, "inputs": {},
              "sandbox": {"wallSeconds": 15, "memoryMB": 900},
              "runtime": {"beam": {"runner": "DirectRunner", "workers": 2}},
              "outputs": {"dataset": str(tmp_path / "out")}}
    path = tmp_path / "step.json"
    path.write_text(json.dumps(config))
    return path


def test_step_config_and_flags(tmp_path):
    path = step_config(tmp_path, repositories=[{"pypi": "toolz==1.0.0"}, {"path": "calc"}],
                       tasksPerRepository=7, policy={"kind": "search", "maxTurns": 40},
                       maxTurns=30)
    job = trajectories.load_job(["--config", str(path), "--workers", "1"])
    settings = job.settings
    assert settings.repositories == ({"pypi": "toolz==1.0.0"}, {"path": "calc"})
    assert settings.spec.tasks_per_repository == 7 and settings.seed == 3
    assert settings.episode_turns == 30  # the policy's budget never exceeds the hard cap
    assert settings.sandbox.wall_seconds == 15 and settings.sandbox.memory_mb == 900
    assert job.output == str(tmp_path / "out") and job.beam["workers"] == 1
    assert job.beam_flags == []


def test_bad_spec_names_the_field(tmp_path):
    path = step_config(tmp_path, mutationFamilies=["operator_replacement", "typo"])
    with pytest.raises(ValueError, match=r"spec\.mutationFamilies\[1\]"):
        trajectories.load_job(["--config", str(path)])


def test_repository_flags():
    assert trajectories.repo_from_flag("toolz==1.0.0") == {"pypi": "toolz==1.0.0"}
    assert trajectories.repo_from_flag("https://github.com/pytoolz/toolz.git#1.0.0") == {
        "git": "https://github.com/pytoolz/toolz.git", "ref": "1.0.0"}
    assert trajectories.repo_from_flag("tests/fixtures/calc") == {"path": "tests/fixtures/calc"}


@pytest.mark.slow
def test_pipeline_writes_a_trajectory_data_set(tmp_path):
    out = tmp_path / "ds"
    stats = trajectories.run(["--repo", "textkit", "--repo", str(tmp_path / "missing"),
                              "--tasks-per-repo", "5", "--held-out-tasks", "1", "--max-turns",
                              "12", "--output", str(out), "--shards", "2"])
    manifest = artifacts.verify(str(out))
    assert manifest.kind == "trajectories"
    records = list(artifacts.iter_records(str(out), "train"))
    assert len(records) == manifest.records("train") == stats["train_records"]
    # five episodes (fewer when candidates share the held-out task's function), near-duplicates
    # dropped
    episodes = stats["episodes"]
    assert 3 <= episodes <= 5 and len(records) + stats["duplicates"] == episodes
    for record in records:
        check_record(record)
        assert record["meta"]["repo"] == "textkit" and record["meta"]["turns"] <= 12
    assert len(stats["tasks_by_repository_family"]["textkit"]) >= 4  # families
    dead = list(artifacts.iter_records(str(out), "deadletter"))
    assert [d["stage"] for d in dead] == ["prepare"] and "missing" in dead[0]["reason"]
    assert sum(stats["tasks_by_repository_family"]["textkit"].values()) == episodes
    assert sum(row["episodes"] for row in stats["solve_rate_by_family"].values()) == episodes
    assert stats["rollouts_per_minute"] > 0
    # held-out tasks for the evaluation: validated, never rolled out
    held_out = list(artifacts.iter_records(str(out), "eval_tasks"))
    assert len(held_out) == stats["eval_tasks"] == 1
    rolled_out = {r["meta"]["task_id"] for r in records}
    assert all(t["task"]["task_id"] not in rolled_out and t["repository"] == {"path": "textkit"}
               for t in held_out)
    # ...and no training task breaks a held-out task's function (its program)
    assert not {trajectories.task_program(t["task"]) for t in held_out} & \
        {trajectories.task_program(r["task"]) for r in records}
    assert set(manifest.programs) == {"train", "eval_tasks"}


def test_repositories_are_dealt_out_to_indexed_job_pods(tmp_path, monkeypatch):
    """Two pods, two repositories: each prepares and rolls out its own; the merged data set's
    stats add up (solve rates recomputed from the summed counts)."""
    out = tmp_path / "ds"
    monkeypatch.setenv("CWM_PARTS", "2")
    for index in ("0", "1"):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
        trajectories.run(["--repo", "calc", "--repo", "textkit", "--tasks-per-repo", "1",
                          "--held-out-tasks", "1", "--max-turns", "8", "--output", str(out)])
    merged = artifacts.verify(str(out))
    parts = [artifacts.read_manifest(artifacts.part_dir(str(out), i)) for i in range(2)]
    assert [p.stats["repositories"] for p in parts] == [merged.stats["repositories"]] * 2
    assert [sorted(p.stats["tasks_by_repository_family"]) for p in parts] == [["calc"], ["textkit"]]
    assert merged.records("train") == sum(p.records("train") for p in parts) >= 1
    assert merged.stats["eval_tasks"] == 2 and merged.stats["parts"] == 2
    for family, row in merged.stats["solve_rate_by_family"].items():
        assert row["rate"] == pytest.approx(row["solved"] / row["episodes"]), family
