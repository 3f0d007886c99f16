"""One episode: a policy acting on a task in a fresh sandboxed copy until it submits or runs out
of turns or tokens; then the task's tests grade it. Failed episodes are kept (CWM keeps them: it
is world-model data either way).

A trajectory is OpenAI-style chat messages (system, task, assistant tool calls, tool
observations) plus ``meta``; the training side renders it with ``cwm_model.chat``. A record is a
function of the task, the policy and the seed: its ``episode_id`` is derived from those
(:func:`episode_id`), and the episode's wall-clock time stays out of it
(:attr:`Trajectory.seconds`), so two runs of a deterministic policy write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cwm_exec import sandbox
from cwm_forager.env import RepoEnvironment
from cwm_forager.mutations import unified_diff
from cwm_forager.tasks import Task
from cwm_forager.tools import TOOLS, ToolRunner

# CWM's system prompt layout (cwm/rl/envs/prompts.py get_cwm_sys_prompt: description, then a
# "# Environment" section); the tool specs follow in their own system message, rendered by
# cwm_model.chat from TOOLS as CWM's server does.
SYSTEM_PROMPT = (
    "You are a helpful AI assistant.\n\n# Environment\n\n"
    "You are working in a Python repository inside a sandbox, with the tools below: bash, edit "
    "(one SEARCH/REPLACE block), create (a new file) and submit. Each action's output is shown "
    "to you, shortened if long. Investigate, fix the bug in the source code, check with the "
    "tests, then write your fix as a patch file in git diff format and submit its path."
)
NUDGE = "Continue with a tool call, or call submit when you are done."


@dataclass
class Action:
    """What a policy returns: an assistant message, and token usage if the policy knows it."""

    message: dict[str, Any]
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Policy(Protocol):
    name: str

    def act(self, messages: Sequence[dict[str, Any]],
            tools: Sequence[dict[str, Any]]) -> Action: ...


@dataclass
class Trajectory:
    """An episode's messages and ``meta`` (the record), and its wall-clock ``seconds``, which
    are not part of the record (they differ between any two runs)."""

    messages: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def success(self) -> bool:
        return bool(self.meta.get("success"))

    def actions(self) -> list[tuple[str, str]]:
        """(tool name, JSON arguments) of every tool call, in order."""
        return [(c["function"]["name"], c["function"]["arguments"])
                for m in self.messages if m["role"] == "assistant"
                for c in m.get("tool_calls") or []]

    def observations(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "tool"]

    def to_record(self) -> dict[str, Any]:
        return {"messages": self.messages, "meta": self.meta}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Trajectory:
        if not isinstance(record.get("messages"), list):
            raise ValueError("trajectory record: 'messages' must be a list")
        return cls(list(record["messages"]), dict(record.get("meta") or {}))


def estimate_tokens(text: str) -> int:
    """About four characters per token (used when the policy reports no usage)."""
    return (len(text) + 3) // 4


def _normalise(message: dict[str, Any], turn: int) -> dict[str, Any]:
    """An assistant message in the stored shape, with deterministic tool-call ids."""
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    calls = []
    for i, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append({"id": call.get("id") or f"call_{turn}_{i}", "type": "function",
                      "function": {"name": str(function.get("name", "")), "arguments": arguments}})
    if calls:
        out["tool_calls"] = calls
    return out


def grade(env: RepoEnvironment, task: Task, workdir: Path) -> tuple[bool, list[str]]:
    """Restore the pristine tests, run the task's tests; success if all pass within limits."""
    env.restore_tests(workdir)
    report = env.run_tests(workdir, task.tests)
    failing = report.not_passing(task.tests)
    return report.reason is None and not failing, failing


def episode_id(task: Task, policy: str, seed: int) -> str:
    """The id of the episode of ``policy`` on ``task`` with ``seed``: the same for every run of
    that episode (a data set written twice is the same), distinct across tasks, policies and
    seeds (give each sample of a task its own seed)."""
    key = json.dumps([task.repo, task.task_id, policy, seed])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def run_episode(env: RepoEnvironment, task: Task, policy: Policy, max_turns: int = 128, *,
                max_observation_chars: int = 8000, action_timeout: float = 60.0,
                max_tokens: int = 131072, seed: int = 0) -> Trajectory:
    """Run one episode; see the module docstring. Never raises for a policy or tool failure:
    the trajectory records why it stopped. ``seed`` names the episode (:func:`episode_id`); it is
    the policy that samples, with its own seed."""
    start = time.monotonic()
    workdir = env.fresh_task_copy(task)
    try:
        runner = ToolRunner(env, workdir, max_observation_chars=max_observation_chars,
                            action_timeout=action_timeout)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": task.statement(runner.root)}]
        loop = _Loop()
        loop.run(policy, runner, messages, max_turns, max_tokens)
        final = (workdir / task.path).read_text(encoding="utf-8", errors="replace")
        success, still_failing = grade(env, task, workdir)
    finally:
        env.discard(workdir)
    name = getattr(policy, "name", type(policy).__name__)
    meta = {
        "repo": task.repo, "task_id": task.task_id, "family": task.family, "path": task.path,
        "function": task.function, "line": task.line, "mutation": task.description,
        "failing_tests": list(task.failing_tests), "gold_patch": task.gold_patch,
        "patch": unified_diff(task.mutated, final, task.path),
        "success": success, "still_failing": still_failing, "submitted": loop.stop == "submitted",
        "stop": loop.stop, "error": loop.error, "turns": loop.turns,
        "tokens": {"prompt": loop.prompt_tokens, "completion": loop.completion_tokens,
                   "total": loop.prompt_tokens + loop.completion_tokens},
        "policy": name, "isolation": sandbox.isolation(),
        "max_turns": max_turns, "max_observation_chars": max_observation_chars,
        "action_timeout": action_timeout, "episode_id": episode_id(task, name, seed),
    }
    return Trajectory(messages, meta, round(time.monotonic() - start, 3))


@dataclass
class _Loop:
    """The agent loop of one episode and what it counted; ``stop`` says why it ended."""

    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    nudged: bool = False
    stop: str = "max_turns"
    error: str | None = None

    def run(self, policy: Policy, runner: ToolRunner, messages: list[dict[str, Any]],
            max_turns: int, max_tokens: int) -> None:
        while self.turns < max_turns:
            try:
                action = policy.act(messages, TOOLS)
            except Exception as err:  # a model endpoint failing is recorded, not fatal
                self.stop, self.error = "policy_error", f"{type(err).__name__}: {err}"
                return
            self.turns += 1
            message = _normalise(action.message, self.turns)
            messages.append(message)
            self._count(action, messages)
            calls = message.get("tool_calls") or []
            if not calls:
                if self.nudged:
                    self.stop = "no_action"
                    return
                messages.append({"role": "user", "content": NUDGE})
                self.nudged = True
                continue
            submitted = False
            for call in calls:
                result = runner.call(call["function"]["name"], call["function"]["arguments"])
                messages.append({"role": "tool", "tool_call_id": call["id"],
                                 "content": result.observation})
                submitted = submitted or result.done
            if submitted:
                self.stop = "submitted"
                return
            if self.prompt_tokens + self.completion_tokens >= max_tokens:
                self.stop = "token_budget"
                return

    def _count(self, action: Any, messages: list[dict[str, Any]]) -> None:
        """Tokens as the endpoint reports them, else estimated from the text."""
        self.completion_tokens += action.completion_tokens \
            if action.completion_tokens is not None else estimate_tokens(json.dumps(messages[-1]))
        self.prompt_tokens = action.prompt_tokens if action.prompt_tokens is not None \
            else sum(estimate_tokens(json.dumps(m)) for m in messages[:-1])


def replay_actions(env: RepoEnvironment, task: Task, trajectory: Trajectory, *,
                   max_observation_chars: int | None = None,
                   action_timeout: float | None = None) -> list[str]:
    """Run a stored trajectory's actions again on a fresh copy of the same task and return the
    observations (a deterministic environment reproduces the stored ones)."""
    meta = trajectory.meta
    workdir = env.fresh_task_copy(task)
    try:
        chars = max_observation_chars or meta.get("max_observation_chars", 8000)
        runner = ToolRunner(env, workdir, max_observation_chars=chars,
                            action_timeout=action_timeout or meta.get("action_timeout", 60.0))
        return [runner.call(name, arguments).observation
                for name, arguments in trajectory.actions()]
    finally:
        env.discard(workdir)
