"""The agent's tool definitions, for rendering trajectories as chat (no torch: the tokenizer step
renders trajectories too, and it runs on the Beam image, which has no torch)."""

from __future__ import annotations

from typing import Any


def agent_tools() -> list[dict[str, Any]] | None:
    """The ForagerAgent's tool definitions: trajectory records leave them out, and the agent saw
    them in its system prompt, so training renders them the same way."""
    try:  # optional: cwm_forager is the trajectories step's package, absent where it is not installed
        from cwm_forager.tools import TOOLS  # noqa: PLC0415
    except ImportError:
        return None
    return list(TOOLS)
