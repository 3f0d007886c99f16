"""Reinforcement learning with CWM's GRPO variant, rewards verified by execution.

Each step, every rank draws ``promptsPerStep`` tasks of the families ``rl.tasks`` names (half
each when both): *output prediction* — programs from the traces data set with their true results;
``groupSize`` answers are sampled per prompt, each scored 1 if it evaluates equal to the true
value in the sandbox, else 0 — and *mutate-fix* — tasks of the trajectory data set's train
records; the model itself acts as the agent ``groupSize`` times per task (sampling, at most
``rl.maxTurns`` turns, each attempt in a fresh sandboxed copy of the repository), scored 1 if the
task's failing tests pass again. Then, as in CWM:

* advantage = reward - mean reward of its group (no division by the group's std);
* groups whose advantages are all zero are skipped (they carry no signal);
* the clipped surrogate uses ``epsLow`` 0.2 below and ``epsHigh`` 0.25 above (clip-higher);
* the token losses are summed and divided by a fixed ``maxLength`` times the number of samples,
  not by each sample's length;
* no KL term; environment tokens of multi-turn episodes are masked out of the loss.

Sampling is on-policy (one update per batch), so the old log-probabilities are the current ones
detached and the ratio starts at 1; the clipping matters for stale samples. Task choice and
sampling seeds depend only on (seed, step, rank), so a resumed run draws the same batches.

One process::

    python -m cwm_jobs.rl --config step.json

Several::

    torchrun --standalone --nproc_per_node 2 -m cwm_jobs.rl --config step.json
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cwm_exec.sandbox import Limits
from cwm_exec.trace_format import TraceFormatError
from cwm_forager.env import Environments
from cwm_forager.rollout import run_episode
from cwm_forager.tasks import Task
from cwm_forager.tools import TOOLS
from cwm_jobs.common import distributed_session, load_context
from cwm_jobs.data import stable_random
from cwm_jobs.evaluate import (ModelPolicy, chat_prompt_ids, evaluate_model,
                               output_prediction_accuracy, stop_ids)
from cwm_jobs.rewards import check_outputs
from cwm_jobs.tasks import OutputTask, extract_answer, prompt_messages, task_from_trace
from cwm_jobs.trainer import all_mean, full_parameters, open_stage
from cwm_model.chat import encode_segments, render_messages
from cwm_model.generate import generate
from cwm_spec.artifacts import iter_records, read_manifest

LOG = logging.getLogger("cwm_jobs.rl")


# --------------------------------------------------------------------------- GRPO math (pure)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: reward minus its group's mean, no std scaling."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def informative_groups(advantages: torch.Tensor) -> torch.Tensor:
    """(P,) bool: groups with any non-zero advantage (all-equal rewards teach nothing)."""
    return advantages.abs().amax(dim=1) > 0


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, max_length: int, num_samples: int, eps_low: float,
              eps_high: float) -> torch.Tensor:
    """Clipped surrogate loss over completion tokens.

    ``logp``/``old_logp``/``mask``: (N, T) per-token log-probabilities and loss mask (0 for
    prompt, padding and environment tokens); ``advantages``: (N,). The sum of token losses is
    divided by ``num_samples * max_length`` (fixed, so long answers are not favoured).
    """
    ratio = torch.exp(logp - old_logp)  # (N, T)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped) * mask
    return per_token.sum() / float(num_samples * max_length)


def token_logprobs(model: Any, sequences: torch.Tensor) -> torch.Tensor:
    """(N, L) token ids -> (N, L - 1) log-probability of each next token."""
    logits = model(sequences[:, :-1])  # (N, L-1, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, sequences[:, 1:, None]).squeeze(-1)


# --------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    """One sampled answer: prompt ids, completion ids, which completion tokens are the agent's
    (1) rather than the environment's (0), and its reward."""
    prompt: list[int]
    completion: list[int]
    agent_mask: list[int]
    reward: float = 0.0
    group: int = 0


def pad_episodes(episodes: Sequence[Episode], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, L) token ids and the (N, L - 1) loss mask aligned with
    :func:`token_logprobs` (mask[i, t] covers the prediction of token t + 1)."""
    length = max(len(e.prompt) + len(e.completion) for e in episodes)
    ids = torch.full((len(episodes), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(episodes), length - 1))
    for i, e in enumerate(episodes):
        seq = e.prompt + e.completion
        ids[i, : len(seq)] = torch.tensor(seq)
        start = len(e.prompt) - 1
        mask[i, start: start + len(e.completion)] = torch.tensor(e.agent_mask, dtype=torch.float32)
    return ids, mask


def task_pool(traces_uri: str, tokenizer: Any, *, split: str, limit: int, max_prompt: int,
              stats: Counter) -> list[tuple[OutputTask, list[int]]]:
    """Output-prediction tasks (with their prompt ids) from the traces data set, in data set
    order (identical on every rank). Traces that raise, never return or do not parse are
    counted and skipped."""
    pool = []
    for record in iter_records(traces_uri, split):
        if len(pool) >= limit:
            break
        try:
            task = task_from_trace(record["text"], record.get("frames"))
        except (KeyError, TypeError, TraceFormatError):
            stats["rl/unparsable_traces"] += 1
            continue
        if task is None:
            stats["rl/no_return_value"] += 1
            continue
        ids = chat_prompt_ids(tokenizer, prompt_messages(task))
        if len(ids) > max_prompt:
            stats["rl/prompt_too_long"] += 1
            continue
        pool.append((task, ids))
    return pool


def sample_episodes(module: Any, tokenizer: Any, pool: Sequence[tuple[OutputTask, list[int]]],
                    *, step: int, seed: int, rank: int, prompts: int, group: int,
                    max_new_tokens: int, temperature: float, sandbox: Any) -> list[Episode]:
    """Draw this rank's prompts for ``step``, sample a group of answers each, score them."""
    rng = stable_random("rl-prompts", seed, step, rank)
    chosen = [pool[rng.randrange(len(pool))] for _ in range(prompts)]
    prompt_ids = [ids for _, ids in chosen for _ in range(group)]
    was_training = module.training
    module.eval()
    with torch.no_grad():
        completions = generate(module, prompt_ids, max_new_tokens=max_new_tokens,
                               temperature=temperature, stop_ids=stop_ids(tokenizer),
                               seed=int(stable_random("rl-sample", seed, step, rank).random() * 2**31))
    module.train(was_training)
    answers = [extract_answer(tokenizer.decode(c)) for c in completions]
    expected = [task.expected for task, _ in chosen for _ in range(group)]
    rewards = check_outputs(list(zip(answers, expected)), sandbox)
    return [Episode(list(p), list(c), [1] * len(c), float(r), i // group)
            for i, (p, c, r) in enumerate(zip(prompt_ids, completions, rewards))]


# --------------------------------------------------------------------------- mutate-fix episodes


def agent_episode(tokenizer: Any, messages: Sequence[dict[str, Any]], reward: float, group: int,
                  max_tokens: int) -> Episode:
    """A multi-turn agent episode as one sequence, rendered as the model saw it: the prompt is
    everything before the agent's first turn; in the rest, the agent's tokens are trained (mask
    1) and the environment's — tool observations, nudges, turn headers — masked (0). Cut at
    ``max_tokens`` (the model's context)."""
    ids, roles = encode_segments(tokenizer, render_messages(messages, tools=TOOLS))
    ids, roles = ids[:max_tokens], roles[:max_tokens]
    first = max(1, next((i for i, r in enumerate(roles) if r == "assistant"), len(ids)))
    return Episode(ids[:first], ids[first:], [int(r == "assistant") for r in roles[first:]],
                   reward, group)


def mutate_fix_pool(trajectories_uri: str, *, limit: int, stats: Counter) -> list[tuple[dict, Any]]:
    """(repository spec, task) of the trajectory data set's train records, in data set order."""
    pool = []
    for record in iter_records(trajectories_uri, "train"):
        if len(pool) >= limit:
            break
        try:
            pool.append((record["meta"]["repository"], Task.from_json(record["task"])))
        except (KeyError, TypeError, ValueError):
            stats["rl/trajectories_without_task"] += 1
    return pool


def sample_agent_episodes(module: Any, tokenizer: Any, pool: Sequence[tuple[dict, Any]],
                          envs: Environments, *, step: int, seed: int, rank: int, prompts: int,
                          group: int, first_group: int, max_new_tokens: int, temperature: float,
                          max_turns: int, max_tokens: int) -> list[Episode]:
    """Draw this rank's mutate-fix tasks for ``step``; the model, sampling, works each one
    ``group`` times in a fresh copy of its repository; reward 1 if the task's tests pass."""
    rng = stable_random("rl-agent-tasks", seed, step, rank)
    chosen = [pool[rng.randrange(len(pool))] for _ in range(prompts)]
    episodes = []
    for p, (spec, task) in enumerate(chosen):
        env = envs.get(spec)
        for g in range(group):
            policy = ModelPolicy(module, tokenizer, max_new_tokens, temperature=temperature,
                                 seed=stable_random("rl-agent", seed, step, rank, p, g).randrange(2**31))
            trajectory = run_episode(env, task, policy, max_turns)
            episodes.append(agent_episode(tokenizer, trajectory.messages, float(trajectory.success),
                                          first_group + p, max_tokens))
    return episodes


def split_prompts(prompts: int, tasks: Sequence[str]) -> tuple[int, int]:
    """(output-prediction, mutate-fix) prompts per step: all to the one family named, or half
    each (at least one each) when both are."""
    if set(tasks) == {"output_prediction"}:
        return prompts, 0
    if set(tasks) == {"mutate_fix"}:
        return 0, prompts
    agent = max(1, prompts // 2)
    return max(1, prompts - agent), agent


# --------------------------------------------------------------------------- the stage


def rl_step(engine: Any, episodes: list[Episode], *, pad_id: int, group: int, max_length: int,
            eps_low: float, eps_high: float, micro_steps: int) -> dict[str, float]:
    """One optimizer step on a batch of episodes (``micro_steps`` engine micro-batches)."""
    rewards = torch.tensor([e.reward for e in episodes]).view(-1, group)  # (P, G)
    advantages = group_advantages(rewards)
    keep = informative_groups(advantages)
    kept = [e for e in episodes if keep[e.group]]
    adv_of = {id(e): float(advantages[e.group, i % group]) for i, e in enumerate(episodes)}
    device = engine.device
    chunks = [kept[i::micro_steps] for i in range(micro_steps)]
    losses = []
    for chunk in chunks:
        # Every rank steps the engine the same number of times, even with nothing to learn from
        # (ZeRO reduces gradients collectively): such a chunk contributes a zero loss.
        batch = chunk or episodes[:1]
        ids, mask = pad_episodes(batch, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        adv = torch.tensor([adv_of[id(e)] if chunk else 0.0 for e in batch], device=device)
        logp = token_logprobs(engine, ids)
        loss = grpo_loss(logp, logp.detach(), adv, mask, max_length=max_length,
                         num_samples=len(episodes), eps_low=eps_low, eps_high=eps_high)
        # DeepSpeed divides by the accumulation steps; undo it so the step's loss is the sum
        # over chunks, i.e. the loss of the whole batch.
        engine.backward(loss * micro_steps)
        engine.step()
        losses.append(float(loss.detach()))
    return {"loss": sum(losses), "reward_mean": float(rewards.mean()),
            "groups_skipped": float((~keep).sum()) / len(keep),
            "completion_tokens": float(sum(len(e.completion) for e in episodes)) / len(episodes)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse, build, train, evaluate; the spec's rules (ZeRO stage, required data) were
    checked by validation before any stage ran (`cwm_spec.validation.SPEC_RULES`)."""
    ctx = load_context("rl", argv)
    s, rl = ctx.settings, ctx.settings.rl
    traces, trajectories = ctx.input("traces"), ctx.input("trajectories")
    n_output, n_agent = split_prompts(rl.prompts_per_step, rl.tasks)
    with distributed_session() as env:
        stage = open_stage(ctx, env, micro_batch_size=1)
        envs = None
        try:
            stats: Counter = Counter()
            pool = task_pool(traces, stage.tokenizer, split="train", limit=10_000,
                             max_prompt=rl.max_length - rl.max_new_tokens, stats=stats)
            if n_output and not pool:
                raise ValueError(f"inputs.traces {traces}: no output-prediction task fits "
                                 f"rl.maxLength {rl.max_length}")
            agent_pool = mutate_fix_pool(trajectories, limit=10_000, stats=stats) if n_agent else []
            if n_agent:
                if not agent_pool:
                    raise ValueError(f"inputs.trajectories {trajectories}: no train record carries "
                                     "its mutate-fix task (regenerate the data set)")
                envs = Environments(Limits.from_spec(ctx.config.get("sandbox")), "cwm-rl-envs-")
            while stage.step < s.steps:
                _train_step(ctx, stage, env, pool, agent_pool, envs, n_output, n_agent)
            results = _final_evaluation(ctx, stage, env, stats)
            stage.finish(results)
            return results
        finally:
            if envs is not None:
                envs.close()
            stage.metrics.close()


def _train_step(ctx: Any, stage: Any, env: Any, pool: Sequence, agent_pool: Sequence,
                envs: Environments | None, n_output: int, n_agent: int) -> None:
    """Sample this step's episodes, take one GRPO step, log, checkpoint when due."""
    s, rl = ctx.settings, ctx.settings.rl
    start = time.perf_counter()
    lr = float(stage.engine.get_lr()[0])
    episodes = sample_episodes(
        stage.engine.module, stage.tokenizer, pool, step=stage.step, seed=ctx.seed,
        rank=env.rank, prompts=n_output, group=rl.group_size,
        max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
        sandbox=ctx.config.get("sandbox")) if n_output else []
    agent = sample_agent_episodes(
        stage.engine.module, stage.tokenizer, agent_pool, envs, step=stage.step,
        seed=ctx.seed, rank=env.rank, prompts=n_agent, group=rl.group_size,
        first_group=n_output, max_new_tokens=rl.max_new_tokens,
        temperature=rl.temperature, max_turns=rl.max_turns,
        max_tokens=stage.engine.module.config.max_seq_len) if n_agent else []
    values = rl_step(stage.engine, episodes + agent, pad_id=stage.tokenizer.pad_id,
                     group=rl.group_size, max_length=rl.max_length, eps_low=rl.eps_low,
                     eps_high=rl.eps_high, micro_steps=s.gradient_accumulation)
    stage.step += 1
    values = {k: all_mean([v]) for k, v in values.items()}
    if episodes and agent:
        values["reward_mean/output_prediction"] = all_mean(
            [sum(e.reward for e in episodes) / len(episodes)])
    if agent:
        values["reward_mean/mutate_fix"] = all_mean([sum(e.reward for e in agent) / len(agent)])
    values.update(lr=lr, step_seconds=time.perf_counter() - start)
    stage.metrics.log(stage.step, values)
    if stage.step % s.checkpoint_every == 0 or stage.step == s.steps:
        stage.save_state({})


def _final_evaluation(ctx: Any, stage: Any, env: Any, stats: Counter) -> dict[str, float]:
    """The end-of-stage evaluation, plus output-prediction accuracy on held-out traces."""
    rl, traces = ctx.settings.rl, ctx.input("traces")
    with full_parameters(stage.engine) as module:
        results = evaluate_model(module, stage.tokenizer, rank=env.rank,
                                 world=env.world_size, traces_uri=traces,
                                 trajectories_uri=ctx.input("trajectories"),
                                 evaluation=ctx.evaluation, sandbox=ctx.config.get("sandbox"),
                                 max_tokens=rl.max_length * 4)
        held_out = task_pool(traces, stage.tokenizer, split="validation",
                             limit=int(ctx.evaluation.get("heldOutTraces", 200)),
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
