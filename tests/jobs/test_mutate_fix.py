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


def test_an_agent_episode_trains_on_the_agents_tokens_only(tokenizer):
    """Multi-turn RL: the agent's turns are trained, the environment's observations masked."""
    from cwm_jobs.rl import agent_episode

    call = {"id": "c1", "type": "function",
            "function": {"name": "bash", "arguments": '{"command": "pytest -q"}'}}
    messages = [{"role": "system", "content": "You fix bugs."},
                {"role": "user", "content": "Fix calc/ops.py."},
                {"role": "assistant", "content": "Run the tests.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "FAILED test_add - assert 5 == 6"},
                {"role": "assistant", "content": "Found it: the operator."}]
    episode = agent_episode(tokenizer, messages, reward=1.0, group=3, max_tokens=4096)
    trained = tokenizer.decode([t for t, m in zip(episode.completion, episode.agent_mask) if m])
    masked = tokenizer.decode([t for t, m in zip(episode.completion, episode.agent_mask) if not m])
    assert "Run the tests." in trained and "Found it: the operator." in trained
    assert "pytest -q" in trained  # the tool call is the agent's action
    assert "FAILED test_add" in masked and "FAILED" not in trained
    assert "Fix calc/ops.py." in tokenizer.decode(episode.prompt)
    assert episode.reward == 1.0 and episode.group == 3
    short = agent_episode(tokenizer, messages, reward=0.0, group=0, max_tokens=40)
    assert len(short.prompt) + len(short.completion) == 40


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
