"""RL raises the verified reward on a task family the ``debug`` model can learn on a CPU.

The family (:func:`cwm_jobs.tasks.comparison_tasks`): ``def f(x): return x <= x``-style programs,
True three times in four. First the SFT stage teaches the answer *format* on the same questions
with answers drawn at random, mostly the rarer one (True one time in four), so the policy starts
well below 0.5 reward and knows nothing about the operators. Then the RL stage trains on traced
programs with rewards checked in the sandbox. A policy that does not improve (a sign error, masks
on the wrong tokens, skipped updates) keeps the reward near its start and fails the test. The
run must also show the GRPO machinery at work: the clip acting across the several updates of a
batch, and the asynchronous rollouts' policy lag.

(With answers drawn 50/50, where the SFT stage ends is left to chance: a start of 0.6 leaves
no room to show a rise below the 0.75 of always answering True, which is where the policy goes
within 30 steps. The learning rate of the one-update-per-batch version, 3e-3, overshoots with
four updates per batch on this model: in one run the reward fell to 0 for four steps before
recovering; 1e-3 rises smoothly.)
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from cwm_jobs import rl, sft
from cwm_jobs.metrics import read_metrics
from cwm_jobs.tasks import comparison_tasks, prompt_messages
from tests.jobs.jobhelpers import stage_config, traced_records, write_dataset

RL_STEPS = 30


def comparison_data(root: Path, true_share: float = 0.25) -> tuple[str, str]:
    """The traces data set (train, and held-out programs) and the SFT warm-up's replies, whose
    answers are True with probability ``true_share``."""
    train = traced_records([(t.source, t.call[2:-1]) for t in comparison_tasks(280, seed=7)])
    # Held out by program, as the evaluation's decontamination check demands: the family has
    # one program per operator, so the held-out ones name their argument y (another program
    # hash, the same comparisons).
    held_out = traced_records([(t.source.replace("x", "y"), t.call[2:-1])
                               for t in comparison_tasks(20, seed=8)])
    traces_uri = write_dataset(root / "traces", "traces", {"train": train, "validation": held_out})
    rng = random.Random(0)
    # Reasoning-mode replies (CWM's prompt ends with "<think>\n"), the reasoning left empty.
    warmup = [{"messages": [*prompt_messages(t),
                            {"role": "assistant",
                             "content": "True" if rng.random() < true_share else "False",
                             "reasoning_content": ""}]}
              for t in comparison_tasks(400, seed=11)]
    return traces_uri, write_dataset(root / "warmup", "trajectories", {"train": warmup})


def warm_up(pipeline_data: dict, root: Path, warmup_uri: str) -> str:
    """The SFT stage on the warm-up replies; its checkpoint."""
    inputs = {**pipeline_data, "traces": None, "corpus": None, "trajectories": warmup_uri}
    cfg = stage_config(root, "sft", inputs, evaluation={"cruxeval": False, "heldOutTraces": 0},
                       spec={"steps": 60, "microBatchSize": 8, "sequenceLength": 256,
                             "learningRate": 1e-2, "warmupSteps": 5, "checkpointEvery": 1000})
    sft.main(["--config", str(cfg)])
    return str(root / "sft" / "checkpoint")


def run_rl(pipeline_data: dict, root: Path, traces_uri: str, init: str, *, lr: float = 1e-3,
           updates: int = 4) -> tuple[dict, list[dict]]:
    """The RL stage from ``init``: its evaluation and its per-step metrics."""
    inputs = {**pipeline_data, "traces": traces_uri, "corpus": None, "trajectories": None}
    cfg = stage_config(root, "rl", inputs, init=init,
                       evaluation={"cruxeval": False, "heldOutTraces": 20},
                       spec={"steps": RL_STEPS, "learningRate": lr, "minLearningRate": lr,
                             "warmupSteps": 0, "checkpointEvery": 1000,
                             "rl": {"groupSize": 8, "promptsPerStep": 8, "maxNewTokens": 12,
                                    "maxLength": 256, "temperature": 1.0,
                                    "updatesPerBatch": updates}})
    results = rl.main(["--config", str(cfg)])
    return results, read_metrics(root / "rl" / "metrics" / "metrics.jsonl")


@pytest.mark.slow
def test_mean_reward_rises(pipeline_data, dist_group, tmp_path):
    traces_uri, warmup_uri = comparison_data(tmp_path)
    results, records = run_rl(pipeline_data, tmp_path, traces_uri,
                              warm_up(pipeline_data, tmp_path, warmup_uri))
    rewards = [r["reward_mean"] for r in records]
    assert len(rewards) == RL_STEPS
    first, last = statistics.mean(rewards[:5]), statistics.mean(rewards[-10:])
    curve = " ".join(f"{r:.2f}" for r in rewards)
    print(f"rl reward curve: first5={first:.3f} last10={last:.3f} "
          f"heldout={results['rl_heldout_accuracy']:.3f}: {curve}")
    assert first < 0.7, f"the warm-up already solved the task: {curve}"
    assert last >= first + 0.1 and last >= 0.6, f"reward did not rise: {curve}"
    assert results["rl_heldout_accuracy"] >= 0.6
    # GRPO as CWM runs it: rl.updatesPerBatch (4) optimiser steps per batch move the ratio away
    # from the sampling policy's, so the clip acts; the rollout thread samples one batch ahead,
    # so every batch after the first trains with a policy lag of 1 and none is stale.
    print(f"rl clip fractions: low={results['rl/clip_fraction_low']:.4f} "
          f"high={results['rl/clip_fraction_high']:.4f} "
          f"ratio_dev_max={results['rl/ratio_dev_max']:.3f}; per step: sampling "
          f"{statistics.mean(r['rollout_seconds'] for r in records):.2f} s, the trainer waited "
          f"{statistics.mean(r['wait_seconds'] for r in records):.2f} s, step "
          f"{statistics.mean(r['step_seconds'] for r in records):.2f} s")
    assert results["rl/clip_fraction_low"] + results["rl/clip_fraction_high"] > 0
    assert [r["policy_lag"] for r in records] == [0] + [1] * (RL_STEPS - 1)
    assert (results["rl/policy_lag/0"], results["rl/policy_lag/1"]) == (64, 64 * (RL_STEPS - 1))
    assert results["rl/stale_dropped"] == 0
