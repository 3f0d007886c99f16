"""ForagerAgent: mutate-fix tasks in real repositories, an agent acting with tools, and the
trajectories it leaves (CWM tech report, section on agentic data).

Modules, in pipeline order: :mod:`.repos` (fetch a repository), :mod:`.env` (prepare it once,
sandboxed task copies, test runs with coverage), :mod:`.mutations` and :mod:`.tasks` (synthetic
bugs validated by failing tests), :mod:`.tools` (bash/view/create/edit/submit), :mod:`.policies`
(an OpenAI-compatible model, or the built-in search-based repair policy), :mod:`.rollout`
(episodes), :mod:`.records` (trajectory records, rendering, MinHash deduplication).

Names are imported lazily: the pytest plugin and the ``sbfl`` command, which run inside every
sandboxed test run, import this package and should not pay for the rest of it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FAMILIES": "mutations", "RepoEnvironment": "env", "TestReport": "env",
    "RepoSource": "repos", "Task": "tasks", "synthesize_tasks": "tasks", "TOOLS": "tools",
    "ToolRunner": "tools", "SearchRepairPolicy": "policies", "OpenAIPolicy": "policies",
    "Trajectory": "rollout", "run_episode": "rollout", "replay_actions": "rollout",
}
__all__ = ["FAMILIES", "OpenAIPolicy", "RepoEnvironment", "RepoSource", "SearchRepairPolicy",
           "TOOLS", "TestReport", "ToolRunner", "Task", "Trajectory", "replay_actions",
           "run_episode", "synthesize_tasks"]  # the keys of _EXPORTS


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cwm_forager.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cwm_forager' has no attribute {name!r}")
