"""RL rollouts: sampled episodes kept as the tokens the policy sampled, with the sampling
policy's log-probability of each one.

Two task families, rewards verified by execution:

* *output prediction* -- programs from the traces data set with their true results; ``group``
  answers are sampled per prompt (one batched generation), each scored 1 if it evaluates equal
  to the true value in the sandbox, else 0;
* *mutate-fix* -- tasks of the trajectory data set's train records; the model acts as the agent
  ``group`` times per task in fresh sandboxed copies of the repository, scored 1 if the task's
  failing tests pass again. :class:`SampledPolicy` keeps the episode as one token sequence: the
  agent's turns are the token ids it sampled (not the reply re-rendered from parsed messages,
  which need not tokenise the same way), the environment's turns (tool output, nudges, turn
  headers) are rendered by CWM's chat template between them and masked out of the loss.

Every episode records the policy *version* (batches trained) of the weights that sampled it, so
the trainer can measure its lag and drop it when stale (``cwm_jobs.grpo.drop_stale``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from cwm_exec.trace_format import TraceFormatError
from cwm_forager.env import Environments
from cwm_forager.rollout import Action, run_episode
from cwm_forager.tasks import Task
from cwm_jobs.data import stable_random
from cwm_jobs.evaluate import chat_prompt_ids, stop_ids
from cwm_jobs.rewards import check_outputs
from cwm_jobs.tasks import OutputTask, extract_answer, prompt_messages, task_from_trace
from cwm_model.chat import encode_segments, parse_assistant, render_messages
from cwm_model.generate import generate
from cwm_spec.artifacts import iter_records


@dataclass
class Episode:
    """One sampled answer or agent episode: prompt ids, completion ids, which completion tokens
    the policy sampled (1) rather than the environment produced (0), the sampling policy's
    log-probability of each completion token (0.0 for environment tokens), its reward, its
    group, and the policy version that sampled it."""
    prompt: list[int]
    completion: list[int]
    agent_mask: list[int]
    logprobs: list[float] = field(default_factory=list)
    reward: float = 0.0
    group: int = 0
    version: int = 0

    def __post_init__(self) -> None:
        if not self.logprobs:
            self.logprobs = [0.0] * len(self.completion)
        if not len(self.completion) == len(self.agent_mask) == len(self.logprobs):
            raise ValueError(f"episode: completion ({len(self.completion)}), agent_mask "
                             f"({len(self.agent_mask)}) and logprobs ({len(self.logprobs)}) "
                             "must have one entry per token")


def pad_episodes(episodes: Sequence[Episode], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (N, L) token ids, and the (N, L - 1) loss mask and sampling log-probabilities
    aligned with :func:`token_logprobs` (column t covers the prediction of token t + 1)."""
    length = max(len(e.prompt) + len(e.completion) for e in episodes)
    ids = torch.full((len(episodes), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(episodes), length - 1))
    old = torch.zeros((len(episodes), length - 1))
    for i, e in enumerate(episodes):
        seq = e.prompt + e.completion
        ids[i, : len(seq)] = torch.tensor(seq)
        start, end = len(e.prompt) - 1, len(e.prompt) - 1 + len(e.completion)
        mask[i, start:end] = torch.tensor(e.agent_mask, dtype=torch.float32)
        old[i, start:end] = torch.tensor(e.logprobs, dtype=torch.float32)
    return ids, mask, old


def token_logprobs(model: Any, sequences: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, L) token ids -> (N, L - 1) log-probability of each next token under
    ``softmax(logits / temperature)``: the distribution the tokens were sampled from
    (``cwm_model.generate.sample``), so the ratio to the recorded ones is 1 for the same weights."""
    logits = model(sequences[:, :-1])  # (N, L-1, V)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, sequences[:, 1:, None]).squeeze(-1)


def sample_tokens(module: Any, prompts: list[list[int]], **options: Any
                  ) -> tuple[list[list[int]], list[list[float]]]:
    """Sampled ids for each prompt and each id's log-probability under the distribution it was
    sampled from (``cwm_model.generate.generate`` with ``return_logprobs``)."""
    return cast(tuple[list[list[int]], list[list[float]]],
                generate(module, prompts, return_logprobs=True, **options))


# --------------------------------------------------------------------------- output prediction


def task_pool(traces_uri: str, tokenizer: Any, *, split: str, limit: int, max_prompt: int,
              stats: Counter) -> list[tuple[OutputTask, list[int]]]:
    """Output-prediction tasks (with their prompt ids) from the traces data set, in data set
    order (identical on every rank). Traces that raise, never return or do not parse are
    counted and skipped."""
    pool: list[tuple[OutputTask, list[int]]] = []
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


@dataclass(frozen=True)
class Sampling:
    """What every rollout of one run shares: who samples (seed, rank), how (temperature, token
    and turn budgets) and where answers are checked (the sandbox settings)."""
    seed: int
    rank: int
    group: int
    max_new_tokens: int
    temperature: float
    max_turns: int = 8
    sandbox: Any = None


def sample_episodes(module: Any, tokenizer: Any, pool: Sequence[tuple[OutputTask, list[int]]],
                    how: Sampling, *, step: int, prompts: int, version: int) -> list[Episode]:
    """Draw this rank's prompts for ``step``, sample a group of answers each (keeping each
    token's log-probability), score them."""
    rng = stable_random("rl-prompts", how.seed, step, how.rank)
    chosen = [pool[rng.randrange(len(pool))] for _ in range(prompts)]
    prompt_ids = [ids for _, ids in chosen for _ in range(how.group)]
    seed = int(stable_random("rl-sample", how.seed, step, how.rank).random() * 2**31)
    completions, logprobs = sample_tokens(module, prompt_ids, max_new_tokens=how.max_new_tokens,
                                          temperature=how.temperature,
                                          stop_ids=stop_ids(tokenizer), seed=seed)
    answers = [extract_answer(tokenizer.decode(c)) for c in completions]
    expected = [task.expected for task, _ in chosen for _ in range(how.group)]
    rewards = check_outputs(list(zip(answers, expected)), how.sandbox)
    return [Episode(list(p), list(c), [1] * len(c), list(lp), float(r), i // how.group, version)
            for i, (p, c, lp, r) in enumerate(zip(prompt_ids, completions, logprobs, rewards))]


# --------------------------------------------------------------------------- mutate-fix


class SampledPolicy:
    """The model as the agent, keeping the episode as the tokens it saw and sampled.

    Each :meth:`act` appends the environment's new messages (rendered by CWM's chat template,
    the generation prompt included) to the token context, samples the reply *from that context*
    and appends the sampled ids with their log-probabilities. The reply is parsed into tool
    calls for the environment, but the context keeps what was sampled. Reasoning is off, as for
    the agent in evaluation (``cwm_jobs.evaluate.ModelPolicy``). A context that would outgrow the
    model raises, which the agent loop records as a policy error (the episode ends, failed).
    """

    name = "rl-policy"

    def __init__(self, module: Any, tokenizer: Any, max_new_tokens: int, *, temperature: float,
                 seed: int) -> None:
        self.module, self.tokenizer = module, tokenizer
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.ids: list[int] = []
        self.sampled: list[int] = []
        self.logprobs: list[float] = []
        self.seen = 0  # messages already in the context (the agent's last reply included)
        self.turns = 0

    def act(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> Action:
        delta = self._environment_tokens(messages, tools)
        room = self.module.config.max_seq_len - len(self.ids) - len(delta)
        if room < 1:
            raise ValueError(f"the episode outgrew the model's context "
                             f"({self.module.config.max_seq_len} tokens)")
        self._append(delta, sampled=0, logprobs=[0.0] * len(delta))
        stops = stop_ids(self.tokenizer)
        [out], [lps] = sample_tokens(self.module, [list(self.ids)],
                                     max_new_tokens=min(self.max_new_tokens, room),
                                     temperature=self.temperature, stop_ids=stops,
                                     seed=self.seed + self.turns)
        self.turns += 1
        prompt_tokens = len(self.ids)
        self._append(out, sampled=1, logprobs=lps)
        text = self.tokenizer.decode(out[:-1] if out and out[-1] in stops else out)
        # The loop stores the reply after these messages; the next act() renders only what the
        # environment adds after it.
        self.seen = len(messages) + 1
        return Action(parse_assistant(text, tools, think=False), prompt_tokens, len(out))

    def _environment_tokens(self, messages: Sequence[dict[str, Any]],
                            tools: Sequence[dict[str, Any]]) -> list[int]:
        full = render_messages(messages, tools=tools, add_generation_prompt=True, think=False)
        known = render_messages(messages[:self.seen], tools=tools) if self.seen else []
        if full[:len(known)] != known:
            raise ValueError("the chat template rendered the episode's earlier turns differently")
        ids, _ = encode_segments(self.tokenizer, full[len(known):])
        return ids

    def _append(self, ids: Sequence[int], *, sampled: int, logprobs: Sequence[float]) -> None:
        self.ids += list(ids)
        self.sampled += [sampled] * len(ids)
        self.logprobs += list(logprobs)

    def episode(self, reward: float, group: int, version: int) -> Episode:
        """The episode: everything before the first sampled token is the prompt."""
        first = next((i for i, s in enumerate(self.sampled) if s), len(self.ids))
        first = max(first, 1)
        prompt = self.ids[:first] or [self.tokenizer.bos_id]  # context overflow at the first turn
        return Episode(prompt, self.ids[first:], self.sampled[first:],
                       self.logprobs[first:], reward, group, version)


def mutate_fix_pool(trajectories_uri: str, *, limit: int, stats: Counter) -> list[tuple[dict, Any]]:
    """(repository spec, task) of the trajectory data set's train records, in data set order."""
    pool: list[tuple[dict, Any]] = []
    for record in iter_records(trajectories_uri, "train"):
        if len(pool) >= limit:
            break
        try:
            pool.append((record["meta"]["repository"], Task.from_json(record["task"])))
        except (KeyError, TypeError, ValueError):
            stats["rl/trajectories_without_task"] += 1
    return pool


def sample_agent_episodes(module: Any, tokenizer: Any, pool: Sequence[tuple[dict, Any]],
                          envs: Environments, how: Sampling, *, step: int, prompts: int,
                          first_group: int, version: int) -> list[Episode]:
    """Draw this rank's mutate-fix tasks for ``step``; the model, sampling, works each one
    ``group`` times in a fresh copy of its repository; reward 1 if the task's tests pass."""
    rng = stable_random("rl-agent-tasks", how.seed, step, how.rank)
    chosen = [pool[rng.randrange(len(pool))] for _ in range(prompts)]
    episodes = []
    for p, (spec, task) in enumerate(chosen):
        env = envs.get(spec)
        for g in range(how.group):
            seed = stable_random("rl-agent", how.seed, step, how.rank, p, g).randrange(2**31)
            policy = SampledPolicy(module, tokenizer, how.max_new_tokens,
                                   temperature=how.temperature, seed=seed)
            trajectory = run_episode(env, task, policy, how.max_turns)
            episodes.append(policy.episode(float(trajectory.success), first_group + p, version))
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
