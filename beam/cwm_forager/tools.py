"""The agent's tools, as in CWM's ForagerAgent harness: ``bash``, ``view``, ``create``, ``edit``
(SEARCH/REPLACE) and ``submit``.

``bash`` runs in the environment's executor (the sandbox, with the per-action timeout as its
wall-clock limit); ``view``, ``create`` and ``edit`` only read and write files of the task copy
and refuse paths that resolve outside it. Every observation is capped (head and tail kept, the
middle elided with a note of how much), and wall-clock durations printed by pytest are masked so
that replaying the same actions yields the same observations.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cwm_exec import sandbox
from cwm_forager.env import MOUNT, RepoEnvironment, SandboxExecutor

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "bash",
        "description": "Run a bash command in the repository (working directory: the repository "
                       "root). Returns stdout and stderr together, and the exit code.",
        "parameters": {"type": "object", "properties": {
            "command": {"type": "string", "description": "The command line."}},
            "required": ["command"]}}},
    {"type": "function", "function": {
        "name": "view",
        "description": "Show a file with line numbers (optionally a line range), or list a "
                       "directory.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "Path relative to the repository root."},
            "start_line": {"type": "integer", "description": "First line (1-based)."},
            "end_line": {"type": "integer", "description": "Last line (inclusive)."}},
            "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "create",
        "description": "Create or overwrite a file with the given content.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"]}}},
    {"type": "function", "function": {
        "name": "edit",
        "description": "Replace the one occurrence of SEARCH in a file by REPLACE (exact text, "
                       "whitespace included).",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "search": {"type": "string"},
            "replace": {"type": "string"}},
            "required": ["path", "search", "replace"]}}},
    {"type": "function", "function": {
        "name": "submit",
        "description": "Declare the task done; the tests are then run to grade it.",
        "parameters": {"type": "object", "properties": {}}}},
]
TOOL_NAMES = tuple(t["function"]["name"] for t in TOOLS)
_DURATION = re.compile(r"\b(in|took) \d+(\.\d+)?s\b( \(\d+:\d\d:\d\d\))?")


class ToolError(ValueError):
    """A malformed tool call: the message becomes the observation."""


def cap_observation(text: str, limit: int) -> str:
    """Keep the head and tail of an over-long observation; say how much was cut."""
    if len(text) <= limit:
        return text
    note = f"\n[... {len(text) - limit} characters omitted ...]\n"
    keep = max(0, limit - len(note))
    head = keep // 2
    return text[:head] + note + text[len(text) - (keep - head):]


def mask_durations(text: str) -> str:
    """``== 3 passed in 0.52s ==`` → ``== 3 passed in N.NNs ==``: time is not part of the
    environment's state, and masking it keeps replays exact."""
    return _DURATION.sub(lambda m: f"{m.group(1)} N.NNs", text)


@dataclass
class ToolResult:
    observation: str
    done: bool = False


class ToolRunner:
    """Executes tool calls against one task copy (``workdir``) of ``env``."""

    def __init__(self, env: RepoEnvironment, workdir: Path, *, max_observation_chars: int = 8000,
                 action_timeout: float = 60.0) -> None:
        self.env = env
        self.workdir = Path(workdir).resolve()
        self.max_observation_chars = max_observation_chars
        self.limits = replace(env.limits, wall_seconds=action_timeout,
                              cpu_seconds=min(env.limits.cpu_seconds * 6, action_timeout))
        mounted = isinstance(env._executor, SandboxExecutor) and sandbox.isolation() == "bwrap"
        self.root = MOUNT if mounted else str(self.workdir)

    def call(self, name: str, arguments: str | dict[str, Any] | None) -> ToolResult:
        """Run one tool call; malformed calls produce an error observation, never an exception."""
        try:
            args = _parse_arguments(arguments)
            if name not in TOOL_NAMES:
                raise ToolError(f"unknown tool {name!r}; available: {', '.join(TOOL_NAMES)}")
            result = getattr(self, f"_{name}")(**args)
        except ToolError as err:
            result = ToolResult(f"Error: {err}")
        except TypeError as err:  # wrong or missing arguments
            result = ToolResult(f"Error: bad arguments for {name}: {err}")
        return ToolResult(cap_observation(result.observation, self.max_observation_chars),
                          result.done)

    # ------------------------------------------------------------------ tools

    def _bash(self, command: str) -> ToolResult:
        if not isinstance(command, str) or not command.strip():
            raise ToolError("bash needs a non-empty 'command' string")
        result = self.env.run(["/bin/bash", "-c", "exec 2>&1\n" + command], self.workdir,
                              limits=self.limits, at_mount=True)
        text = (result.stdout + result.stderr).decode("utf-8", errors="replace")
        text = mask_durations(text)
        if result.reason:
            text += f"\n[{result.reason}]"
        text += f"\n[exit code {result.returncode}]"
        return ToolResult(text)

    def _view(self, path: str, start_line: int | None = None, end_line: int | None = None) -> ToolResult:
        target = self._resolve(path)
        if target.is_dir():
            entries = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
            return ToolResult("\n".join(entries) or "(empty directory)")
        if not target.is_file():
            raise ToolError(f"{path}: no such file")
        lines = target.read_text(encoding="utf-8", errors="replace").splitlines()
        lo = max(1, int(start_line or 1))
        hi = min(len(lines), int(end_line or len(lines)))
        if lo > hi:
            return ToolResult(f"{path}: {len(lines)} lines; range {lo}-{hi} is empty")
        width = len(str(hi))
        return ToolResult("\n".join(f"{i:>{width}}  {lines[i - 1]}" for i in range(lo, hi + 1)))

    def _create(self, path: str, content: str) -> ToolResult:
        target = self._resolve(path)
        if target.is_dir():
            raise ToolError(f"{path}: is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        return ToolResult(f"Wrote {len(content.splitlines())} lines to {path}")

    def _edit(self, path: str, search: str, replace: str) -> ToolResult:
        target = self._resolve(path)
        if not target.is_file():
            raise ToolError(f"{path}: no such file")
        text = target.read_text(encoding="utf-8")
        count = text.count(search) if search else 0
        if count != 1:
            raise ToolError(f"{path}: SEARCH text found {count} times; it must match exactly "
                            "once (add surrounding lines to make it unique)")
        target.write_text(text.replace(search, replace, 1), encoding="utf-8")
        line = text[: text.index(search)].count("\n") + 1
        return ToolResult(f"Edited {path} at line {line}")

    def _submit(self) -> ToolResult:
        return ToolResult("Submitted.", done=True)

    def _resolve(self, path: str) -> Path:
        """A path inside the task copy; absolute paths are read relative to the repo root."""
        if not isinstance(path, str) or not path:
            raise ToolError("'path' must be a non-empty string")
        rel = path
        for prefix in (self.root, MOUNT, str(self.workdir)):
            if rel == prefix or rel.startswith(prefix + "/"):
                rel = rel[len(prefix):].lstrip("/") or "."
                break
        if rel.startswith("/"):
            raise ToolError(f"{path}: outside the repository ({self.root})")
        target = (self.workdir / rel).resolve()
        if target != self.workdir and self.workdir not in target.parents:
            raise ToolError(f"{path}: outside the repository ({self.root})")
        return target


def _parse_arguments(arguments: str | dict[str, Any] | None) -> dict[str, Any]:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as err:
        raise ToolError(f"arguments are not valid JSON ({err})") from None
    if not isinstance(parsed, dict):
        raise ToolError("arguments must be a JSON object")
    return parsed
