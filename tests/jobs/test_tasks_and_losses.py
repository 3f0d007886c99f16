"""Output-prediction tasks, sandboxed rewards, GRPO math, chat loss masks, trace metrics."""

from __future__ import annotations

import pytest
import torch

from cwm_jobs.data import Position, chat_document, trajectory_document
from cwm_jobs.evaluate import frame_spans, trace_exact_match
from cwm_jobs.grpo import group_advantages, grpo_loss, informative_groups
from cwm_jobs.rewards import check_outputs
from cwm_jobs.rollouts import Episode, pad_episodes
from cwm_jobs.tasks import (
    OutputTask,
    comparison_tasks,
    extract_answer,
    sft_messages,
    task_from_cruxeval,
    task_from_trace,
    trace_ids,
)
from tests.jobs.jobhelpers import traced_records, trajectory_records


def test_a_trace_becomes_an_output_prediction_task_with_the_trace_as_reasoning():
    [record] = traced_records([("def f(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n",
                                "[1, 2]")])
    task = task_from_trace(record["text"], record["frames"])
    assert task == task_from_trace(record["text"])  # the frames only settle ambiguous text
    assert task.call == "f([1, 2])" and task.expected == "3"
    assert "START_OF_TRACE" not in task.source
    assert task.reasoning.startswith("<|call_sep|>") and task.reasoning.endswith("<|frame_sep|>")
    system, _, answer = sft_messages(task)
    assert system["content"].startswith("You are a helpful AI assistant. You always reason")
    assert answer == {"role": "assistant", "content": "3", "reasoning_content": task.reasoning}
    [raising] = traced_records([("def f(x):\n    return 1 // x\n", "0")])
    assert task_from_trace(raising["text"]) is None  # nothing to predict


def test_answers_are_read_after_the_reasoning_without_stop_tokens():
    # CWM's reasoning is plain text: the prompt ends with "<think>\n", the reply closes it.
    assert extract_answer("x is 1, so...\n</think>\n [1, 2]\nmore") == "[1, 2]"
    assert extract_answer("True<|eot_id|>") == "True"
    assert extract_answer("<think>\nnever closed") == ""
    crux = task_from_cruxeval({"code": "def f(a):\n    return a", "input": "'x'", "output": "'x'"})
    assert crux.call == "f('x')"


def test_rewards_are_verified_by_evaluation_in_the_sandbox():
    verdicts = check_outputs([("3", "3"), ("[1,2]", "[1, 2]"), ("{2, 1}", "{1, 2}"), ("4", "3"),
                              ("", "3"), ("__import__('os').getpid()", "1"), ("x", "1")])
    assert verdicts == [True, True, True, False, False, False, False]


def test_a_pathological_answer_costs_only_itself():
    verdicts = check_outputs([("'a' * 10**10", "'a'"), ("True", "True")], {"memoryMB": 256})
    assert verdicts == [False, True]


def test_comparison_tasks_are_right_by_execution():
    tasks = comparison_tasks(60, seed=2)
    expected = [t.expected for t in tasks]
    assert set(expected) == {"True", "False"} and 0.6 < expected.count("True") / 60 < 0.9
    records = traced_records([(t.source, t.call[2:-1]) for t in tasks[:5]])
    assert [task_from_trace(r["text"]).expected for r in records] == expected[:5]


def test_advantages_are_centred_per_group_without_std_scaling():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.allclose(adv[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    assert informative_groups(adv).tolist() == [True, False, True]


def test_grpo_loss_clips_asymmetrically_and_divides_by_a_fixed_length():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.zeros(1, 3)
    kwargs = {"max_length": 10, "num_samples": 2, "eps_low": 0.2, "eps_high": 0.25}
    # ratio 1: loss = -A * (tokens in mask) / (samples * max_length)
    assert grpo_loss(old, old, torch.tensor([2.0]), mask, **kwargs) == pytest.approx(-2 * 2 / 20)
    # a positive advantage stops gaining past 1 + eps_high; a negative one past 1 - eps_low
    high = torch.log(torch.full((1, 3), 1.5))
    assert grpo_loss(high, old, torch.tensor([1.0]), mask, **kwargs) == pytest.approx(-1.25 * 2 / 20)
    low = torch.log(torch.full((1, 3), 0.5))
    assert grpo_loss(low, old, torch.tensor([-1.0]), mask, **kwargs) == pytest.approx(0.8 * 2 / 20)
    # no gradient flows where the clip is active
    logp = high.clone().requires_grad_()
    grpo_loss(logp, old, torch.tensor([1.0]), mask, **kwargs).backward()
    assert torch.count_nonzero(logp.grad) == 0
    # longer answers are not normalised away: the loss scales with the masked token count
    longer = torch.ones(1, 3)
    assert grpo_loss(old, old, torch.tensor([1.0]), longer, **kwargs) == pytest.approx(-3 / 20)


def test_episode_masks_and_sampling_logprobs_cover_agent_tokens_only():
    episodes = [Episode([5, 6, 7], [8, 9], [1, 1], [-0.5, -1.5]),
                Episode([5], [8, 9, 10], [1, 0, 1], [-0.25, 0.0, -2.0])]
    ids, mask, old = pad_episodes(episodes, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 0]]
    # mask[i, t] and old[i, t] cover predicting ids[i, t + 1]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 0, 1, 0]]
    assert old.tolist() == [[0, 0, -0.5, -1.5], [-0.25, 0, -2.0, 0]]
    with pytest.raises(ValueError, match="one entry per token"):
        Episode([5], [8, 9], [1, 1], [-0.5])


def test_sft_trains_on_assistant_turns_only(tokenizer):
    task = OutputTask("def f():\n    return 1\n", "f()", "1")
    doc = chat_document(tokenizer, sft_messages(task))
    trained = tokenizer.decode([t for t, m in zip(doc.tokens, doc.mask) if m])
    # Reasoning mode: "<think>\n" is the prompt's; the reply closes the (empty) reasoning.
    assert trained == "\n</think>\n1<|eot_id|>"
    assert doc.tokens[0] == tokenizer.bos_id


def test_trajectories_train_on_both_sides_with_observations_masked_at_the_rate(tokenizer):
    [record] = trajectory_records(1)
    observation = "AssertionError"

    def trained_text(rate: float, line: int) -> str:
        doc = trajectory_document(tokenizer, record, Position(0, 0, line, line), seed=0, mask_rate=rate)
        return tokenizer.decode([t for t, m in zip(doc.tokens, doc.mask) if m])

    assert observation in trained_text(0.0, 0) and "Let me run" in trained_text(0.0, 0)
    assert observation not in trained_text(1.0, 0) and "Let me run" in trained_text(1.0, 0)
    masked = sum(observation not in trained_text(0.5, n) for n in range(200))
    assert 70 < masked < 130
    sft = trajectory_document(tokenizer, record, Position(), seed=0, mask_rate=0.0, assistant_only=True)
    text = tokenizer.decode([t for t, m in zip(sft.tokens, sft.mask) if m])
    assert observation not in text and "You fix bugs" not in text and "Let me run" in text


def test_frame_spans_split_state_from_action(tokenizer):
    [record] = traced_records([("def f(x):\n    y = x + 1\n    return y\n", "1")])
    ids = trace_ids(tokenizer, record)
    fs, acts = tokenizer.token_id("<|frame_sep|>"), tokenizer.token_id("<|action_sep|>")
    spans = frame_spans(ids, fs, acts)
    assert len(spans) == 4  # call, two lines, return
    start, split, end = spans[1]
    assert tokenizer.decode(ids[start:split]).startswith("<|line_sep|>{")
    assert tokenizer.decode(ids[split:end]) == "    y = x + 1\n<|frame_sep|>"


def test_trace_exact_match_is_perfect_for_a_model_that_knows_the_trace(tokenizer):
    """A stand-in model that always predicts the true next token scores 1.0; one that is one
    token off in every action scores 0 on actions but still 1.0 on states."""
    [record] = traced_records([("def f(x):\n    y = x + 1\n    return y\n", "1")])
    ids = trace_ids(tokenizer, record)

    class Oracle(torch.nn.Module):
        def __init__(self, corrupt_actions: bool):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.corrupt = corrupt_actions

        def forward(self, x):
            nxt = ids[1: x.shape[1] + 1]
            if self.corrupt:
                spans = frame_spans(ids, tokenizer.token_id("<|frame_sep|>"), tokenizer.token_id("<|action_sep|>"))
                nxt = list(nxt)
                for _, split, _ in spans:
                    nxt[split - 1] = (nxt[split - 1] + 1) % tokenizer.vocab_size
            return torch.nn.functional.one_hot(torch.tensor([nxt]), tokenizer.vocab_size).float()

    perfect = trace_exact_match(Oracle(False), tokenizer, [record], 4096)
    assert perfect["trace_step_exact_match"] == 1.0 and perfect["trace_frames"] == 4
    off = trace_exact_match(Oracle(True), tokenizer, [record], 4096)
    assert off["trace_state_exact_match"] == 1.0 and off["trace_action_exact_match"] == 0.0
    # token level: every frame token right, bar one token per action
    assert perfect["trace_token_accuracy"] == 1.0
    assert 0.8 < off["trace_token_accuracy"] < 1.0
    assert off["trace_token_loss"] > perfect["trace_token_loss"]
