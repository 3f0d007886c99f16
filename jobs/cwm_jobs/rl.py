"""Reinforcement learning with CWM's GRPO variant, rewards verified by execution.

Each step is one batch of rollouts: every rank draws ``promptsPerStep`` tasks of the families
``rl.tasks`` names (half each when both) and samples ``groupSize`` answers or agent episodes per
task (:mod:`cwm_jobs.rollouts`: output prediction checked in the sandbox, mutate-fix graded by
the task's tests). Each episode keeps the token ids the policy sampled and their
log-probabilities under the sampling policy. Then, as in CWM (the math in
:mod:`cwm_jobs.grpo`):

* advantage = reward - mean reward of its group (no division by the group's std);
* groups whose advantages are all zero are skipped (they carry no signal);
* ``rl.updatesPerBatch`` optimiser steps on the batch, one per mini-batch; the ratio is taken to
  the *sampling* policy's recorded log-probabilities, so from the second step on (and for
  batches sampled ahead) it moves, and the clipped surrogate with ``epsLow`` 0.2 below and
  ``epsHigh`` 0.25 above (clip-higher) acts: ``clip_fraction_low``/``_high`` in the metrics;
* the token losses are summed and divided by a fixed ``maxLength`` times the number of samples,
  not by each sample's length;
* no KL term; environment tokens of multi-turn episodes are masked out of the loss.

Rollouts are asynchronous (:mod:`cwm_jobs.rollout_thread`): with ``rl.rolloutsAhead`` >= 1 a
thread samples the next batches from a snapshot of the policy while the trainer updates on the
current one; the trainer publishes its weights after each batch. A batch's *policy lag* is the
number of batches trained since the weights that sampled it; trajectories lagging more than
``rl.maxPolicyLag`` are dropped and counted (``policy_lag``, ``stale_dropped`` per step; the
whole run's lag distribution as ``rl/policy_lag/N`` in the evaluation). ``rolloutsAhead`` 0
samples and trains in turn, on-policy. Task choice and sampling seeds depend only on (seed,
step, rank), so a resumed run draws the same tasks.

One process::

    python -m cwm_jobs.rl --config step.json

Several::

    torchrun --standalone --nproc_per_node 2 -m cwm_jobs.rl --config step.json
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cwm_exec.sandbox import Limits
from cwm_forager.env import Environments
from cwm_jobs.common import distributed_session, load_context
from cwm_jobs.evaluate import evaluate_model, output_prediction_accuracy
from cwm_jobs.grpo import (
    ClipCounts,
    clip_counts,
    drop_stale,
    group_advantages,
    grpo_loss,
    informative_groups,
    minibatches,
)
from cwm_jobs.rollout_thread import RolloutBatch, RolloutThread
from cwm_jobs.rollouts import (
    Episode,
    Sampling,
    mutate_fix_pool,
    pad_episodes,
    sample_agent_episodes,
    sample_episodes,
    split_prompts,
    task_pool,
    token_logprobs,
)
from cwm_jobs.trainer import all_mean, full_parameters, open_stage
from cwm_spec.api import RLSpec
from cwm_spec.artifacts import read_manifest

LOG = logging.getLogger("cwm_jobs.rl")


# --------------------------------------------------------------------------- one batch


def weighted(episodes: Sequence[Episode], group: int) -> tuple[list[tuple[Episode, float]], float]:
    """Each episode of an informative group with its advantage, and the share of groups
    skipped. ``episodes`` come in groups of ``group``, in order."""
    rewards = torch.tensor([float(e.reward) for e in episodes]).view(-1, group)  # (P, G)
    advantages = group_advantages(rewards)
    keep = informative_groups(advantages)
    pairs = [(e, float(advantages[i // group, i % group]))
             for i, e in enumerate(episodes) if keep[i // group]]
    return pairs, float((~keep).sum()) / len(keep)


def micro_step(engine: Any, chunk: Sequence[tuple[Episode, float]], filler: Episode, *,
               pad_id: int, rl: RLSpec, samples: float, micro_steps: int
               ) -> tuple[float, ClipCounts]:
    """One engine micro-step on ``chunk``; its loss and where the clip acted."""
    # Every rank steps the engine the same number of times, even with nothing to learn from
    # (ZeRO reduces gradients collectively): such a chunk contributes a zero loss.
    batch = [e for e, _ in chunk] or [filler]
    ids, mask, old = (t.to(engine.device) for t in pad_episodes(batch, pad_id))
    adv = torch.tensor([a for _, a in chunk] or [0.0], device=engine.device)
    if not chunk:
        mask = torch.zeros_like(mask)
    logp = token_logprobs(engine, ids, rl.temperature)
    loss = grpo_loss(logp, old, adv, mask, max_length=rl.max_length, num_samples=samples,
                     eps_low=rl.eps_low, eps_high=rl.eps_high)
    counts = clip_counts(logp, old, adv, mask, eps_low=rl.eps_low, eps_high=rl.eps_high)
    # DeepSpeed divides by the accumulation steps; undo it so the optimiser step's loss is the
    # sum over its micro-steps, i.e. the loss of the whole mini-batch.
    engine.backward(loss * micro_steps)
    engine.step()
    return float(loss.detach()), counts


def update_on_batch(engine: Any, episodes: Sequence[Episode], trained: Sequence[Episode], *,
                    pad_id: int, rl: RLSpec, micro_steps: int
                    ) -> tuple[dict[str, float], ClipCounts]:
    """``rl.updatesPerBatch`` optimiser steps (each ``micro_steps`` engine micro-steps) on the
    ``trained`` episodes (``episodes`` minus the stale); the batch's metrics and clip counts."""
    pairs, skipped = weighted(trained, rl.group_size) if trained else ([], 0.0)
    samples = len(episodes) / rl.updates_per_batch  # a mini-batch's share, fixed
    counts, losses = ClipCounts(), []
    for mini in minibatches(pairs, rl.updates_per_batch):
        loss = 0.0
        for chunk in minibatches(mini, micro_steps):
            value, c = micro_step(engine, chunk, episodes[0], pad_id=pad_id, rl=rl,
                                  samples=samples, micro_steps=micro_steps)
            loss += value
            counts.add(c)
        losses.append(loss)
    return {"loss": sum(losses) / len(losses), "reward_mean": _mean(e.reward for e in episodes),
            "groups_skipped": skipped,
            "completion_tokens": _mean(len(e.completion) for e in episodes),
            **counts.fractions()}, counts


def _mean(values: Any) -> float:
    values = list(values)
    return float(sum(values)) / max(len(values), 1)


# --------------------------------------------------------------------------- the stage


@dataclass
class Source:
    """Where a step's episodes come from: both task families' pools, the repositories'
    environments, and how to sample. Called as the rollout thread's sampler."""
    tokenizer: Any
    how: Sampling
    pool: Sequence = ()
    agent_pool: Sequence = ()
    envs: Environments | None = None
    n_output: int = 0
    n_agent: int = 0

    def __call__(self, module: torch.nn.Module, step: int, version: int) -> list[Episode]:
        if self.n_agent and self.envs is None:
            raise ValueError("mutate-fix prompts need the repositories' environments")
        out = sample_episodes(module, self.tokenizer, self.pool, self.how, step=step,
                              prompts=self.n_output, version=version) if self.n_output else []
        agent = sample_agent_episodes(module, self.tokenizer, self.agent_pool, self.envs,  # type: ignore[arg-type]
                                      self.how, step=step, prompts=self.n_agent,
                                      first_group=self.n_output, version=version) \
            if self.n_agent else []
        return out + agent


@dataclass
class RunTotals:
    """What the whole run counted, for the evaluation: the lag of every sampled trajectory
    (stale ones included), the stale ones dropped, and the clip counts."""
    lags: Counter = field(default_factory=Counter)
    stale: int = 0
    clips: ClipCounts = field(default_factory=ClipCounts)


def build_source(ctx: Any, stage: Any, env: Any, stats: Counter) -> Source:
    """The pools (identical on every rank) and, for mutate-fix, the environments."""
    rl, traces, trajectories = ctx.settings.rl, ctx.input("traces"), ctx.input("trajectories")
    n_output, n_agent = split_prompts(rl.prompts_per_step, rl.tasks)
    how = Sampling(seed=ctx.seed, rank=env.rank, group=rl.group_size,
                   max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                   max_turns=rl.max_turns, sandbox=ctx.config.get("sandbox"))
    source = Source(stage.tokenizer, how, n_output=n_output, n_agent=n_agent)
    if n_output:
        source.pool = task_pool(traces, stage.tokenizer, split="train", limit=10_000,
                                max_prompt=rl.max_length - rl.max_new_tokens, stats=stats)
        if not source.pool:
            raise ValueError(f"inputs.traces {traces}: no output-prediction task fits "
                             f"rl.maxLength {rl.max_length}")
    if n_agent:
        source.agent_pool = mutate_fix_pool(trajectories, limit=10_000, stats=stats)
        if not source.agent_pool:
            raise ValueError(f"inputs.trajectories {trajectories}: no train record carries "
                             "its mutate-fix task (regenerate the data set)")
        source.envs = Environments(Limits.from_spec(ctx.config.get("sandbox")), "cwm-rl-envs-")
    return source


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse, build, train, evaluate; the spec's rules (ZeRO stage, required data, the lag
    bound, mini-batches) were checked by validation before any stage ran
    (`cwm_spec.validation.SPEC_RULES`)."""
    ctx = load_context("rl", argv)
    s, rl = ctx.settings, ctx.settings.rl
    if rl is None:  # StageSpec fills in the rl stage's defaults: only a malformed config lacks it
        raise ValueError("spec.rl: the rl stage has no GRPO settings")
    with distributed_session() as env:
        stage = open_stage(ctx, env, micro_batch_size=1)
        source, thread = None, None
        try:
            stats: Counter = Counter()
            source = build_source(ctx, stage, env, stats)
            if rl.rollouts_ahead and stage.step < s.steps:
                thread = RolloutThread(stage.engine.module, source, first=stage.step,
                                       last=s.steps, ahead=rl.rollouts_ahead).start()
            totals = RunTotals()
            while stage.step < s.steps:
                _train_step(ctx, stage, source, thread, totals)
            results = _final_evaluation(ctx, stage, env, stats)
            results.update(_run_summary(totals, rl.rollouts_ahead, env.world_size))
            stage.finish(results)
            return results
        finally:
            if thread is not None:
                thread.close()
            if source is not None and source.envs is not None:
                source.envs.close()
            stage.metrics.close()


def _next_batch(stage: Any, source: Source, thread: RolloutThread | None) -> RolloutBatch:
    """This step's batch: from the rollout thread, or sampled here with the current weights."""
    if thread is not None:
        batch = thread.get()
        if batch.step != stage.step:
            raise RuntimeError(f"the rollout thread sampled step {batch.step} for step {stage.step}")
        return batch
    start = time.perf_counter()
    episodes = source(stage.engine.module, stage.step, stage.step)
    return RolloutBatch(stage.step, stage.step, episodes, time.perf_counter() - start)


def _train_step(ctx: Any, stage: Any, source: Source, thread: RolloutThread | None,
                totals: RunTotals) -> None:
    """Take this step's batch, drop what is stale, update, publish the weights, log, and
    checkpoint when due."""
    s, rl = ctx.settings, ctx.settings.rl
    start = time.perf_counter()
    lr = float(stage.engine.get_lr()[0])
    batch = _next_batch(stage, source, thread)
    waited = time.perf_counter() - start
    trained, lags = drop_stale(batch.episodes, lambda e: e.version, current=stage.step,
                               max_lag=rl.max_policy_lag)
    stale = len(batch.episodes) - len(trained)
    values, clips = update_on_batch(stage.engine, batch.episodes, trained,
                             pad_id=stage.tokenizer.pad_id, rl=rl,
                             micro_steps=s.gradient_accumulation)
    stage.step += 1
    if thread is not None:
        thread.publish(stage.engine.module, stage.step)
    totals.lags.update(lags)
    totals.stale += stale
    totals.clips.add(clips)
    values.update(policy_lag=stage.step - 1 - batch.version, stale_dropped=float(stale),
                  rollout_seconds=batch.seconds, wait_seconds=waited)
    values = {k: all_mean([v]) for k, v in values.items()}
    values.update(_family_rewards(batch.episodes, source))
    values.update(lr=lr, step_seconds=time.perf_counter() - start)
    stage.metrics.log(stage.step, values)
    if stage.step % s.checkpoint_every == 0 or stage.step == s.steps:
        stage.save_state({})


def _family_rewards(episodes: Sequence[Episode], source: Source) -> dict[str, float]:
    """Mean reward per task family when both are trained (ranks averaged)."""
    if not (source.n_output and source.n_agent):
        return {"reward_mean/mutate_fix": all_mean([_mean(e.reward for e in episodes)])} \
            if source.n_agent else {}
    output = [e.reward for e in episodes if e.group < source.n_output]
    agent = [e.reward for e in episodes if e.group >= source.n_output]
    return {"reward_mean/output_prediction": all_mean([_mean(output)]),
            "reward_mean/mutate_fix": all_mean([_mean(agent)])}


def _run_summary(totals: RunTotals, ahead: int, world: int) -> dict[str, float]:
    """The run's lag distribution (trajectories per lag, all ranks), stale ones dropped, and the
    clip fractions over every trained token. Keys are the same on every rank."""
    if any(lag > ahead for lag in totals.lags):
        raise RuntimeError(f"policy lags {sorted(totals.lags)} exceed rl.rolloutsAhead {ahead}")
    out = {f"rl/policy_lag/{lag}": all_mean([float(totals.lags[lag])]) * world
           for lag in range(ahead + 1)}
    out["rl/stale_dropped"] = all_mean([float(totals.stale)]) * world
    for key, value in totals.clips.fractions().items():
        out[f"rl/{key}"] = all_mean([value])
    return out


def _final_evaluation(ctx: Any, stage: Any, env: Any, stats: Counter) -> dict[str, float]:
    """The end-of-stage evaluation, plus output-prediction accuracy on held-out traces."""
    rl, traces = ctx.settings.rl, ctx.input("traces")
    with full_parameters(stage.engine) as module:
        results = evaluate_model(module, stage.tokenizer, rank=env.rank,
                                 world=env.world_size, traces_uri=traces,
                                 trajectories_uri=ctx.input("trajectories"),
                                 evaluation=ctx.evaluation_spec, sandbox=ctx.config.get("sandbox"),
                                 max_tokens=rl.max_length * 4)
        held_out = task_pool(traces, stage.tokenizer, split="validation",
                             limit=ctx.evaluation_spec.held_out_traces,
                             max_prompt=rl.max_length, stats=stats) \
            if _has_split(traces, "validation") else []
        if held_out:
            results["rl_heldout_accuracy"] = output_prediction_accuracy(
                module, stage.tokenizer, [t for t, _ in held_out], rank=env.rank,
                world=env.world_size, max_new_tokens=rl.max_new_tokens,
                sandbox=ctx.config.get("sandbox"))
    results.update({f"data/{k}": float(v) for k, v in stats.items()})
    return results


def _has_split(uri: str, split: str) -> bool:
    return bool(read_manifest(uri).splits.get(split))


if __name__ == "__main__":
    main()
