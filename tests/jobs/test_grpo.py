"""CWM's GRPO as it trains: the sampling policy's log-probabilities kept with each rollout, the
ratio that moves across several updates of one batch so the asymmetric clip acts, agent episodes
kept as the tokens sampled, and asynchronous rollouts whose stale trajectories are dropped."""

from __future__ import annotations

import threading

import pytest
import torch

from cwm_forager.rollout import NUDGE, SYSTEM_PROMPT, _normalise
from cwm_forager.tools import TOOLS
from cwm_jobs import rl as rl_stage
from cwm_jobs.engine import LRSchedule, build_engine
from cwm_jobs.evaluate import stop_ids
from cwm_jobs.grpo import ClipCounts, clip_counts, drop_stale, grpo_loss, minibatches
from cwm_jobs.metrics import read_metrics
from cwm_jobs.rl import micro_step, update_on_batch, weighted
from cwm_jobs.rollout_thread import RolloutThread
from cwm_jobs.rollouts import Episode, SampledPolicy, pad_episodes, token_logprobs
from cwm_model.chat import encode_segments, render_messages
from cwm_model.generate import generate
from cwm_model.model import CWM
from cwm_model.presets import get_preset
from cwm_spec.api import RLSpec, StageSpec
from tests.jobs.jobhelpers import stage_config

EPS = {"eps_low": 0.2, "eps_high": 0.25}


# --------------------------------------------------------------------------- pure pieces


def test_clip_counts_split_low_and_high_by_the_advantage_sign():
    old = torch.zeros(1, 4)
    # ratios 1.5, 0.5, 1.1, 1.5 (last token masked out)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    up = clip_counts(logp, old, torch.tensor([1.0]), mask, **EPS)
    assert (up.tokens, up.high, up.low) == (3, 1, 0)  # 1.5 > 1.25 with A > 0; 0.5 still learns
    down = clip_counts(logp, old, torch.tensor([-1.0]), mask, **EPS)
    assert (down.tokens, down.high, down.low) == (3, 0, 1)  # 0.5 < 0.8 with A < 0
    assert up.fractions()["clip_fraction_high"] == pytest.approx(1 / 3)
    assert up.ratio_dev_max == pytest.approx(0.5)
    # the tokens counted as clipped are exactly those the loss gives no gradient
    for adv, counts in ((1.0, up), (-1.0, down)):
        x = logp.clone().requires_grad_()
        grpo_loss(x, old, torch.tensor([adv]), mask, max_length=4, num_samples=1, **EPS).backward()
        assert int(((x.grad == 0) & (mask > 0)).sum()) == counts.high + counts.low


def test_clip_counts_add_up_and_default_to_no_clipping():
    total = ClipCounts()
    assert total.fractions() == {"clip_fraction_low": 0.0, "clip_fraction_high": 0.0,
                                 "ratio_mean": 1.0, "ratio_dev_max": 0.0}
    total.add(ClipCounts(tokens=4, low=1, high=0, ratio_sum=4.0, ratio_dev_max=0.3))
    total.add(ClipCounts(tokens=4, low=0, high=2, ratio_sum=4.4, ratio_dev_max=0.1))
    assert total.fractions() == pytest.approx({"clip_fraction_low": 1 / 8, "clip_fraction_high": 2 / 8,
                                               "ratio_mean": 8.4 / 8, "ratio_dev_max": 0.3})


def test_minibatches_deal_round_robin_and_keep_their_count():
    assert minibatches(list(range(5)), 2) == [[0, 2, 4], [1, 3]]
    assert minibatches([1], 3) == [[1], [], []]
    with pytest.raises(ValueError, match="count"):
        minibatches([1], 0)


def test_stale_trajectories_are_dropped_and_every_lag_counted():
    versions = [5, 4, 3, 5, 2]
    kept, lags = drop_stale(versions, lambda v: v, current=5, max_lag=1)
    assert kept == [5, 4, 5]
    assert dict(lags) == {0: 2, 1: 1, 2: 1, 3: 1}
    with pytest.raises(ValueError, match="newer than the trainer"):
        drop_stale([6], lambda v: v, current=5, max_lag=1)


def test_advantages_weigh_informative_groups_only():
    episodes = [Episode([1], [2], [1], reward=r, group=i // 2) for i, r in enumerate([1, 0, 1, 1])]
    pairs, skipped = weighted(episodes, group=2)
    assert [(e.reward, a) for e, a in pairs] == [(1, 0.5), (0, -0.5)]
    assert skipped == 0.5


# --------------------------------------------------------------------------- with a model


def tiny_model(vocab: int, seed: int = 0, max_seq_len: int = 256) -> CWM:
    torch.manual_seed(seed)
    return CWM(get_preset("debug", vocab_size=vocab, max_seq_len=max_seq_len))


def sampled_batch(model: CWM, temperature: float) -> list[Episode]:
    """Two prompts, four sampled answers each, with their sampling log-probabilities; rewards
    1 for answers whose first token is even (something the gradient can push)."""
    prompts = [[1, 5, 9, 13], [1, 7, 11]]
    ids = [p for p in prompts for _ in range(4)]
    outs, lps = generate(model, ids, max_new_tokens=6, temperature=temperature, seed=3,
                         return_logprobs=True)
    rewards = [float(o[0] % 2 == 0) for o in outs]
    rewards[0], rewards[4] = 1.0, 0.0  # both groups informative whatever was sampled
    return [Episode(p, o, [1] * len(o), lp, r, i // 4, 0)
            for i, (p, o, lp, r) in enumerate(zip(ids, outs, lps, rewards))]


def test_recorded_logprobs_are_the_trainers_for_the_same_weights():
    """The ratio starts at exactly 1 (up to float error): generation's per-token
    log-probabilities and the trainer's full forward pass agree, temperature included."""
    model = tiny_model(64)
    for temperature in (1.0, 0.7):
        episodes = sampled_batch(model, temperature)
        ids, mask, old = pad_episodes(episodes, pad_id=0)
        with torch.no_grad():
            logp = token_logprobs(model, ids, temperature)
        assert mask.sum() > 0
        assert torch.allclose(logp * mask, old * mask, atol=1e-4)


def test_several_updates_per_batch_move_the_ratio_and_the_clip_engages(dist_group):
    """The first update of an on-policy batch sees ratio 1; the later ones see the policy the
    earlier ones made, and with a large step the clip acts. A trainer that took the current
    log-probabilities as the old ones (ratio constant 1) fails this test."""
    model = tiny_model(64)
    episodes = sampled_batch(model, 1.0)
    settings = StageSpec(name="rl", learning_rate=0.05, min_learning_rate=0.05, warmup_steps=0,
                         zero_stage=0, rl=RLSpec(updates_per_batch=4, group_size=4,
                                                 prompts_per_step=2, max_length=16))
    engine = build_engine(model, settings, world_size=1, device_type="cpu", micro_batch_size=1)
    pairs, _ = weighted(episodes, 4)
    rl = settings.rl
    per_update = []
    for mini in minibatches(pairs, rl.updates_per_batch):
        _, counts = micro_step(engine, mini, episodes[0], pad_id=0, rl=rl, samples=2.0,
                               micro_steps=1)
        per_update.append(counts)
    assert per_update[0].ratio_dev_max < 1e-3  # on-policy: ratio 1
    assert max(c.ratio_dev_max for c in per_update[1:]) > 0.05
    assert sum(c.low + c.high for c in per_update[1:]) > 0
    # the whole batch again, as the stage runs it: everything is off-policy now
    values, counts = update_on_batch(engine, episodes, episodes, pad_id=0, rl=rl, micro_steps=1)
    assert values["clip_fraction_low"] + values["clip_fraction_high"] > 0
    assert counts.tokens == sum(len(e.completion) for e, _ in pairs)


# --------------------------------------------------------------------------- agent episodes


def test_an_agent_episode_is_the_tokens_the_policy_sampled(tokenizer):
    """Multi-turn RL trains on the agent's sampled ids, with the environment's turns between
    them masked: each turn is generated from exactly the context the episode holds."""
    model = tiny_model(tokenizer.vocab_size, max_seq_len=4096)
    policy = SampledPolicy(model, tokenizer, 8, temperature=1.0, seed=5)
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": "Fix calc/ops.py: test_add fails."}]
    first = policy.act(messages, TOOLS)
    messages += [_normalise(first.message, 1), {"role": "user", "content": NUDGE}]
    policy.act(messages, TOOLS)
    episode = policy.episode(reward=1.0, group=3, version=7)
    seq = episode.prompt + episode.completion

    prompt, _ = encode_segments(tokenizer, render_messages(messages[:2], tools=TOOLS,
                                                           add_generation_prompt=True))
    assert episode.prompt == prompt
    [out1] = generate(model, [prompt], max_new_tokens=8, temperature=1.0, seed=5,
                     stop_ids=stop_ids(tokenizer))
    assert seq[len(prompt): len(prompt) + len(out1)] == out1 and len(out1) > 1
    turn2 = [i for i, m in enumerate(episode.agent_mask) if m][len(out1):]
    context2 = seq[: len(prompt) + turn2[0]]
    [out2] = generate(model, [context2], max_new_tokens=8, temperature=1.0, seed=6,
                     stop_ids=stop_ids(tokenizer))
    assert [episode.completion[i] for i in turn2] == out2
    between = episode.completion[len(out1): turn2[0]]
    assert NUDGE in tokenizer.decode(between)
    # what was sampled, not the reply re-rendered from the parsed message (decoded and encoded
    # again, ids rarely come back the same: here special tokens come back as text)
    rerendered, _ = encode_segments(tokenizer, render_messages(messages, tools=TOOLS))
    assert seq[: len(rerendered)] != rerendered
    # the sampling log-probabilities come with the sampled tokens, zero for the environment's
    assert all(lp < 0 for lp, m in zip(episode.logprobs, episode.agent_mask) if m)
    assert all(lp == 0 for lp, m in zip(episode.logprobs, episode.agent_mask) if not m)
    assert (episode.reward, episode.group, episode.version) == (1.0, 3, 7)


def test_the_policy_refuses_a_context_longer_than_the_model(tokenizer):
    model = tiny_model(tokenizer.vocab_size, max_seq_len=64)
    policy = SampledPolicy(model, tokenizer, 8, temperature=1.0, seed=0)
    with pytest.raises(ValueError, match="outgrew the model's context"):
        policy.act([{"role": "user", "content": "x " * 100}], TOOLS)
    assert policy.episode(0.0, 0, 0).prompt == [tokenizer.bos_id]


# --------------------------------------------------------------------------- asynchronous rollouts


def test_rollouts_overlap_updates_and_lag_by_at_most_the_batches_ahead():
    """The thread samples batch b + 1 while the trainer is on batch b; with two batches ahead and
    a trainer slower than sampling, batches lag by 2 and a lag bound of 1 drops them."""
    model = tiny_model(32)
    began: dict[int, threading.Event] = {s: threading.Event() for s in range(6)}
    sampled_by: dict[int, float] = {}

    def sample(module, step, version):
        sampled_by[step] = float(next(module.parameters()).detach().flatten()[0])
        began[step].set()
        return [Episode([1], [2], [1], [-0.1], 0.0, 0, version)]

    thread = RolloutThread(model, sample, first=0, last=6, ahead=2).start()
    try:
        lags, dropped = [], 0
        for version in range(6):
            batch = thread.get()
            assert batch.step == version
            # the thread is already sampling ahead while the trainer "updates" on this batch
            assert began[min(version + 2, 5)].wait(timeout=60)
            kept, counted = drop_stale(batch.episodes, lambda e: e.version, current=version,
                                       max_lag=1)
            lags += list(counted.elements())
            dropped += len(batch.episodes) - len(kept)
            with torch.no_grad():
                next(model.parameters()).flatten()[0] = float(version + 1)
            thread.publish(model, version + 1)
    finally:
        thread.close()
    assert lags == [0, 1, 2, 2, 2, 2]
    assert dropped == 4
    # the snapshot really was loaded with the published weights (batch 3: version 1's)
    assert sampled_by[3] == 1.0 and sampled_by[5] == 3.0


def test_a_failing_rollout_thread_fails_the_trainer():
    def sample(module, step, version):
        raise OSError("sandbox gone")

    thread = RolloutThread(tiny_model(32), sample, first=0, last=3, ahead=1).start()
    try:
        with pytest.raises(RuntimeError, match="rollout thread failed: sandbox gone"):
            thread.get()
    finally:
        thread.close()


def test_the_learning_rate_schedule_counts_optimiser_steps():
    """An rl step is a batch trained with rl.updatesPerBatch optimiser steps: the schedule (warmup
    included) spans all of them, not the first quarter."""
    stage = StageSpec(name="rl", steps=10, warmup_steps=2, rl=RLSpec(updates_per_batch=4))
    schedule = LRSchedule.from_settings(stage)
    assert (schedule.total_steps, schedule.warmup_steps) == (40, 8)
    assert LRSchedule.from_settings(StageSpec(name="sft", steps=10, warmup_steps=2)).total_steps == 10


# --------------------------------------------------------------------------- the stage


@pytest.mark.parametrize("ahead", [0, 2])
def test_the_stage_counts_every_trajectory_by_lag_and_drops_the_stale(ahead, pipeline_data,
                                                                      dist_group, tmp_path):
    """rolloutsAhead 0: sampled, then trained, always lag 0. 2 with maxPolicyLag 1: how far the
    thread gets ahead depends on timing, but every trajectory is counted at its lag (0..2),
    those at 2 are dropped, and the metrics agree with the evaluation's totals."""
    steps, per_step = 4, 2 * 2
    cfg = stage_config(tmp_path, "rl", pipeline_data,
                       evaluation={"cruxeval": False, "heldOutTraces": 0, "mutateFix": False},
                       spec={"steps": steps, "rl": {"groupSize": 2, "promptsPerStep": 2,
                                                    "maxNewTokens": 4, "maxLength": 256,
                                                    "updatesPerBatch": 2, "rolloutsAhead": ahead,
                                                    "maxPolicyLag": 1}})
    results = rl_stage.main(["--config", str(cfg)])
    records = read_metrics(tmp_path / "rl" / "metrics" / "metrics.jsonl")
    lags = [r["policy_lag"] for r in records]
    assert len(records) == steps and lags[0] == 0 and all(0 <= lag <= ahead for lag in lags)
    if ahead == 0:
        assert lags == [0] * steps
    histogram = [results[f"rl/policy_lag/{lag}"] for lag in range(ahead + 1)]
    assert sum(histogram) == steps * per_step
    assert histogram == [lags.count(lag) * per_step for lag in range(ahead + 1)]
    dropped = [r["stale_dropped"] for r in records]
    assert dropped == [per_step if lag > 1 else 0 for lag in lags]
    assert results["rl/stale_dropped"] == sum(dropped)
