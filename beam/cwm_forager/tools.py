"""The agent's tools, as CWM's: ``bash``, ``edit`` (SEARCH/REPLACE), ``create`` and ``submit``.

Specs, call bodies and behaviour follow github.com/facebookresearch/cwm: the plain-text specs
and bodies are ``cwm_model.chat.NATIVE_TOOL_SPECS`` / ``call_body`` (``serve/tools.py``,
``cwm/rl/envs/envs/swerl_tool.py``); the behaviour and messages are those of
``cwm/rl/swerl/plugins/edit.py`` (one SEARCH/REPLACE block, matched at line starts, unique, a
numbered snippet of the result), ``cwm/rl/swerl/plugins/create.py`` (refuses an existing path
or a missing parent folder) and ``cwm/rl/swerl/tools.py`` ``submit_diff_file`` (a path to a
readable, non-empty file starting with ``diff``; its content is the submission). Records keep
OpenAI-style calls whose JSON arguments map one to one onto those bodies (:data:`TOOLS`); a call
whose arguments are CWM's plain-text body instead (what CWM's own server hands back for tools it
does not map natively) is read as that body.
CWM has no ``view`` tool: files are read with ``bash``.

``bash`` runs in the environment's executor (the sandbox, with the per-action timeout as its
wall-clock limit); ``create``, ``edit`` and ``submit`` only read and write files of the task copy
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
from cwm_model.chat import call_arguments


def _tool(name: str, description: str, **params: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {k: {"type": "string", "description": v}
                                      for k, v in params.items()},
                       "required": list(params)}}}


TOOLS: list[dict[str, Any]] = [
    _tool("bash", "Executes bash command(s) in the current session: any non-interactive bash "
          "command(s), either single or multi-line.", command="The command(s)."),
    _tool("edit", "Replaces search lines from path with replacement lines, where path must exist "
          "and the search lines must uniquely and exactly match one or more consecutive lines "
          "from the original file, including indentations and whitespaces.",
          path="The file.", search="The lines to replace.", replace="The replacement lines."),
    _tool("create", "Creates a new file at path with content, where path must not exist, but its "
          "parent directory must exist.", path="The new file.", content="Its content."),
    _tool("submit", "Marks the result as your final submission: the path to a patch file in git "
          "diff format.", path="The patch file."),
]
TOOL_NAMES = tuple(t["function"]["name"] for t in TOOLS)
SNIPPET_LINES = 8   # edit.py's SNIPPET_LINES: lines shown around an edit
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
            args = _parse_arguments(name, arguments)
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

    def _create(self, path: str, content: str) -> ToolResult:
        """CWM's ``create.py``: never overwrites; the parent folder must exist."""
        target = self._resolve(path)
        if target.exists() or target.is_symlink():
            return ToolResult(f"{path} already exists. Cannot create a new file at an existing "
                              "path.")
        if not target.parent.is_dir():
            return ToolResult(f"File creation failed. The parent directory {target.parent} does "
                              "not exist.")
        target.write_text(content, encoding="utf-8")
        return ToolResult(f"File created successfully at: {path} "
                          f"({content.count(chr(10)) + 1} lines).")

    def _edit(self, path: str, search: str, replace: str) -> ToolResult:
        """CWM's ``edit.py``: SEARCH must match whole lines from a line start, exactly once."""
        target = self._resolve(path)
        if not target.is_file():
            return ToolResult(f"The path {path} does not exist. Please provide a valid path.")
        return ToolResult(apply_search_replace(target, path, search, replace))

    def _submit(self, path: str) -> ToolResult:
        """CWM's ``submit_diff_file``: the content of a readable, non-empty diff file."""
        target = self._resolve(path.strip())
        try:
            content = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return ToolResult(f"Failed to submit {path}. Make sure it exists and is readable.")
        if not content.strip():
            return ToolResult(f"Failed to submit {path}. It is an empty file.")
        if not content.startswith("diff"):
            return ToolResult(f"Failed to submit {path}. It is not a valid diff file.")
        return ToolResult(content, done=True)

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


def _parse_arguments(name: str, arguments: str | dict[str, Any] | None) -> dict[str, Any]:
    """JSON arguments; for CWM's own tools also a plain-text call body (what CWM's server passes
    through for tools it does not map natively, ``serve/tools.py`` ``FunctionTool``)."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as err:
        native = call_arguments(name, arguments) if name in TOOL_NAMES else None
        if native is None:
            raise ToolError(f"arguments are not valid JSON ({err})") from None
        parsed = json.loads(native)
    if not isinstance(parsed, dict):
        raise ToolError("arguments must be a JSON object")
    return parsed


def apply_search_replace(target: Path, shown: str, search: str, replace: str) -> str:
    """Apply one SEARCH/REPLACE to ``target`` (named ``shown`` in messages) and say what
    happened, in CWM's words (``cwm/rl/swerl/plugins/edit.py``)."""
    text = "\n" + target.read_text(encoding="utf-8")   # "\n": matches start at a line start
    needle = "\n" + search
    starts = [m.start() for m in re.finditer(f"(?={re.escape(needle)})", text)]
    if not starts:
        message = (f"No replacement was performed, the search lines did not appear verbatim in "
                   f"{shown}.")
        if search.split("\n", 1)[0].lstrip() in text:
            message += (" The search lines must exactly match one or more consecutive lines from "
                        "the file, with indentations preserved.")
        return message
    if len(starts) > 1:
        lines = [text.count("\n", 0, start) + 1 for start in starts]
        return (f"No replacement was performed. Multiple occurrences of the search text in lines "
                f"{lines} of {shown}. Please ensure it is unique.")
    new = text.replace(needle, "\n" + replace)[1:]
    target.write_text(new, encoding="utf-8")
    line = text.count("\n", 0, starts[0]) + 1
    first = max(1, line - SNIPPET_LINES)
    last = line + SNIPPET_LINES + replace.count("\n")
    snippet = "\n".join(f"{i:6}\t{row}" for i, row in
                        enumerate(new.split("\n")[first - 1:last], start=first))
    return (f"File {shown} has been successfully updated at line {line} and now contains "
            f"{new.count(chr(10)) + 1} lines. The surrounding lines after the edit are shown "
            f"below:\n{snippet}\nReview the changes and make sure they are as expected.")
