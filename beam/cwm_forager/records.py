"""Trajectory records: validation, rendering into CWM's chat token format, and MinHash
near-duplicate removal.

A record is ``{"messages": [...OpenAI-style chat messages with tool calls...], "meta": {...}}``
(the ``trajectories`` data-set kind of :mod:`cwm_spec.artifacts`). Training renders it with
``cwm_model.chat.render_messages`` and the tool schemas of :data:`TOOLS`; :func:`render` does
exactly that.

Deduplication follows CWM: within a repository, trajectories whose concatenated actions have a
MinHash-estimated Jaccard similarity at or above the threshold (0.5) to an already kept one are
dropped. ``datasketch`` provides MinHash and LSH; LSH candidates are confirmed with the MinHash
estimate, and records are visited in a stable order, so the result is deterministic.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from cwm_forager.tools import TOOL_NAMES, TOOLS
from cwm_model.chat import render_messages

_WORD = re.compile(r"\w+|[^\w\s]")
ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A trajectory record that does not have the documented shape."""


def check_record(record: Any) -> dict[str, Any]:
    """Return the record if it is well formed, else raise naming the bad field."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise RecordError("record: 'messages' must be a list")
    if not isinstance(record.get("meta"), dict):
        raise RecordError("record: 'meta' must be an object")
    pending: set[str] = set()
    for i, message in enumerate(record["messages"]):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise RecordError(f"messages[{i}].role: {role!r} is not one of {ROLES}")
        for call in message.get("tool_calls") or []:
            name = call.get("function", {}).get("name")
            if call.get("type") != "function" or not call.get("id"):
                raise RecordError(f"messages[{i}].tool_calls: each needs an id and type 'function'")
            pending.add(call["id"])
            if not isinstance(call["function"].get("arguments"), str):
                raise RecordError(f"messages[{i}].tool_calls[{name}].arguments must be a JSON string")
        if role == "tool":
            if message.get("tool_call_id") not in pending:
                raise RecordError(f"messages[{i}].tool_call_id: answers no earlier tool call")
            pending.discard(message["tool_call_id"])
    return record


def render(record: dict[str, Any]) -> list[Any]:
    """The record as ``cwm_model.chat`` segments (role-tagged text: header, system, user,
    assistant, tool), the form the SFT and mid-training loaders tokenize and mask."""
    return render_messages(check_record(record)["messages"], tools=TOOLS)


def action_text(record: dict[str, Any]) -> str:
    """The trajectory's actions concatenated: tool names with their arguments' values."""
    parts = []
    for message in record["messages"]:
        if message.get("role") != "assistant":
            continue
        if message.get("content"):
            parts.append(message["content"])
        for call in message.get("tool_calls") or []:
            function = call["function"]
            parts.append(function["name"])
            try:
                arguments = json.loads(function["arguments"])
                values = arguments.values() if isinstance(arguments, dict) else [arguments]
                parts.extend(str(v) for v in values)
            except json.JSONDecodeError:
                parts.append(function["arguments"])
    return "\n".join(parts)


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams (punctuation marks count as words)."""
    words = _WORD.findall(text)
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def minhash(text: str, num_perm: int = 128, seed: int = 1):
    from datasketch import MinHash  # noqa: PLC0415 (imports scipy, ~1 s: only dedup needs it)

    m = MinHash(num_perm=num_perm, seed=seed)
    for shingle in sorted(shingles(text)):
        m.update(shingle.encode("utf-8"))
    return m


def dedup(records: Iterable[dict[str, Any]], threshold: float = 0.5, num_perm: int = 128
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, dropped): a record is dropped if its actions' estimated Jaccard similarity to a
    kept record is ``>= threshold``. Records are visited sorted by (task id, episode id)."""
    from datasketch import MinHashLSH  # noqa: PLC0415 (as above)

    ordered = sorted(records, key=lambda r: (str(r["meta"].get("task_id")),
                                             str(r["meta"].get("episode_id"))))
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    hashes: dict[str, Any] = {}
    kept, dropped = [], []
    for i, record in enumerate(ordered):
        m = minhash(action_text(record), num_perm)
        similar = max((m.jaccard(hashes[key]) for key in lsh.query(m)), default=0.0)
        if similar >= threshold:
            dropped.append({**record, "meta": {**record["meta"], "duplicate_jaccard": round(similar, 3)}})
            continue
        key = str(i)
        lsh.insert(key, m)
        hashes[key] = m
        kept.append(record)
    return kept, dropped


def solve_rates(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per mutation family: episodes, successes and the solve rate."""
    out: dict[str, dict[str, float]] = {}
    for record in records:
        family = record["meta"].get("family", "?")
        row = out.setdefault(family, {"episodes": 0, "solved": 0})
        row["episodes"] += 1
        row["solved"] += bool(record["meta"].get("success"))
    for row in out.values():
        row["rate"] = round(row["solved"] / row["episodes"], 3) if row["episodes"] else 0.0
    return dict(sorted(out.items()))


__all__ = ["TOOL_NAMES", "action_text", "check_record", "dedup", "minhash", "render",
           "shingles", "solve_rates"]
