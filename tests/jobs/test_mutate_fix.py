"""The mutate-fix solve rate: real held-out tasks from a real trajectory step, real episodes in
the sandbox, the model (or a baseline policy) acting through the agent's tools."""

from __future__ import annotations

import pytest
import torch

from cwm_beam import trajectories
from cwm_forager.policies import SearchRepairPolicy
from cwm_jobs.evaluate import evaluate_model, mutate_fix_records, mutate_fix_solve_rate
from cwm_model.model import CWM
from cwm_model.presets import get_preset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def held_out_tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("mutate-fix") / "trajectories"
    stats = trajectories.run(["--repo", "calc", "--tasks-per-repo", "1", "--held-out-tasks", "2",
                              "--families", "operator_replacement", "--max-turns", "12",
                              "--output", str(out)])
    assert stats["eval_tasks"] == 2
    return str(out)


def test_the_solve_rate_counts_real_repairs(held_out_tasks, tokenizer):
    """The search policy repairs operator replacements: the grading sees tests pass again."""
    records = mutate_fix_records(held_out_tasks, limit=8)
    model = CWM(get_preset("debug", vocab_size=tokenizer.vocab_size))
    result = mutate_fix_solve_rate(model, tokenizer, records, rank=0, world=1, max_turns=12,
                                   max_new_tokens=16, policy=SearchRepairPolicy())
    assert result["mutate_fix_tasks"] == 2
    assert result["mutate_fix_solve_rate"] >= 0.5 and result["mutate_fix_mean_turns"] >= 2


def test_an_untrained_model_acts_and_fails(held_out_tasks, tokenizer):
    """The model itself as the agent, through the stage's evaluation entry: every attempt runs
    and is graded; a random model repairs nothing."""
    torch.manual_seed(0)
    model = CWM(get_preset("debug", vocab_size=tokenizer.vocab_size, max_seq_len=4096))
    results = evaluate_model(model, tokenizer, rank=0, world=1, trajectories_uri=held_out_tasks,
                             evaluation={"cruxeval": False, "mutateFixTasks": 1,
                                         "mutateFixTurns": 2, "maxNewTokens": 8})
    assert results["mutate_fix_tasks"] == 1 and results["mutate_fix_solve_rate"] == 0.0
    assert 1 <= results["mutate_fix_mean_turns"] <= 2


def test_rl_stage_with_mutate_fix_tasks(pipeline_data, dist_group, tmp_path, tmp_path_factory):
    """GRPO with both task families: the model works real mutate-fix tasks of the trajectory
    data set (train split) as the agent, in the sandbox, and the stage logs each family's reward."""
    import json

    from cwm_jobs import rl
    from cwm_jobs.metrics import read_metrics
    from tests.jobs.jobhelpers import stage_config

    data = tmp_path_factory.mktemp("rl-mutate-fix") / "trajectories"
    trajectories.run(["--repo", "calc", "--tasks-per-repo", "2", "--held-out-tasks", "0",
                      "--max-turns", "6", "--output", str(data)])
    cfg = stage_config(tmp_path, "rl", {**pipeline_data, "trajectories": str(data)},
                       spec={"steps": 1, "rl": {"groupSize": 2, "promptsPerStep": 2,
                                                "maxNewTokens": 8, "maxTurns": 2, "maxLength": 256,
                                                "tasks": ["output_prediction", "mutate_fix"]}},
                       evaluation={"cruxeval": False, "mutateFix": False})
    config = json.loads(cfg.read_text())
    config["model"]["overrides"] = {"maxSeqLen": 4096}  # room for the agent's prompt and tools
    cfg.write_text(json.dumps(config))
    rl.main(["--config", str(cfg)])
    [record] = read_metrics(tmp_path / "rl" / "metrics" / "metrics.jsonl")
    assert 0 <= record["reward_mean/mutate_fix"] <= 1
    assert 0 <= record["reward_mean/output_prediction"] <= 1
    assert record["completion_tokens"] > 8  # multi-turn agent episodes besides 8-token answers
    assert record["policy_lag"] == 0 and record["stale_dropped"] == 0  # the first batch
