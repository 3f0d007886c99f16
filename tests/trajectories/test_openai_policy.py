"""The OpenAI-compatible policy, end to end: the real ``openai`` client talks to a local server
that speaks the chat-completions protocol (tool calls in, tool results back) and is scripted to
fix a calc task."""

from __future__ import annotations

import difflib
import json
import time

import pytest

from cwm_forager.policies import OpenAIPolicy
from cwm_forager.rollout import run_episode
from cwm_forager.tools import TOOL_NAMES
from tests.scripted_endpoint import JSONHandler, base_url, serving

from .conftest import task_of


class ScriptedModel(JSONHandler):
    """POST /v1/chat/completions → the next scripted tool call, after checking the request is
    what a real server would receive (model, tools, tool results answering earlier calls)."""

    script: list[tuple[str, dict]] = []
    requests: list[dict] = []
    problems: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.read_json()
        type(self).requests.append(body)
        if self.path != "/v1/chat/completions":
            return self.send_json(404, {"error": {"message": f"no route {self.path}"}})
        if self.headers.get("Authorization") != "Bearer test-key":
            type(self).problems.append("missing bearer token")
        names = [t["function"]["name"] for t in body.get("tools", [])]
        if tuple(names) != TOOL_NAMES:
            type(self).problems.append(f"tools {names}")
        calls = {c["id"] for m in body["messages"] if m["role"] == "assistant"
                 for c in m.get("tool_calls") or []}
        answered = {m["tool_call_id"] for m in body["messages"] if m["role"] == "tool"}
        if calls != answered:
            type(self).problems.append(f"unanswered tool calls {calls - answered}")
        step = len([m for m in body["messages"] if m["role"] == "assistant"])
        name, arguments = type(self).script[min(step, len(type(self).script) - 1)]
        message = {"role": "assistant", "content": f"Step {step}: {name}.",
                   "tool_calls": [{"id": f"call_{step}", "type": "function",
                                   "function": {"name": name, "arguments": json.dumps(arguments)}}]}
        self.send_json(200, {
            "id": f"chatcmpl-{step}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls",
                         "logprobs": None}],
            "usage": {"prompt_tokens": 100 + step, "completion_tokens": 20,
                      "total_tokens": 120 + step}})



@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with serving(ScriptedModel) as httpd:
        yield base_url(httpd)


def test_openai_policy_fixes_a_task_through_the_protocol(server, calc_env, calc_tasks):
    task = task_of(calc_tasks, "variable_swap")
    bad, good = next((a, b) for a, b in zip(task.mutated.splitlines(), task.original.splitlines())
                     if a != b)
    test = task.failing_tests[0]
    patch = "".join(difflib.unified_diff(task.mutated.splitlines(True),
                                         task.original.splitlines(True),
                                         f"a/{task.path}", f"b/{task.path}"))
    ScriptedModel.script = [
        ("bash", {"command": f"python -m pytest -q {test}"}),
        ("bash", {"command": f"cat -n {task.path}"}),
        ("edit", {"path": task.path, "search": bad, "replace": good}),
        ("bash", {"command": f"python -m pytest -q {test}"}),
        ("create", {"path": "fix.diff",
                    "content": f"diff --git a/{task.path} b/{task.path}\n{patch}"}),
        ("submit", {"path": "fix.diff"}),
    ]
    ScriptedModel.requests, ScriptedModel.problems = [], []
    policy = OpenAIPolicy(server, "cwm-test", api_key="test-key", temperature=0.0)
    trajectory = run_episode(calc_env, task, policy, max_turns=10, action_timeout=20)

    assert ScriptedModel.problems == []
    assert len(ScriptedModel.requests) == 6 and ScriptedModel.requests[0]["model"] == "cwm-test"
    meta = trajectory.meta
    assert meta["success"] and meta["stop"] == "submitted" and meta["turns"] == 6, meta
    assert meta["policy"] == "openai:cwm-test"
    assert meta["tokens"] == {"prompt": 105, "completion": 120, "total": 225}
    observations = trajectory.observations()
    assert "failed" in observations[0] and "passed" in observations[3]
    assert "has been successfully updated" in observations[2]
    assert observations[5].startswith(f"diff --git a/{task.path}")
