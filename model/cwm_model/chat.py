"""OpenAI-style messages <-> CWM's chat format.

CWM's format (github.com/facebookresearch/cwm ``PROMPTING_GUIDE.md`` and
``cwm/text/tokenizers.py``: ``CWMInstructTokenizer.encode_message``): the conversation starts
with ``<|begin_of_text|>``; each message is ``<|start_header_id|>ROLE<|end_header_id|>\\n\\n``
+ body + ``<|eot_id|>``, ROLE being ``system``, ``user``, ``assistant`` or ``tool: NAME``; bodies
are stripped except tool output. A tool call inside an assistant message is
``<tool: NAME>\\nCONTENT\\n</tool>`` (``cwm/rl/swerl/default_tools.py``: ``TOOL_CALL_REGEX``), and
tools are announced in the system prompt. Reasoning is wrapped in
``<|reasoning_thinking_start|>`` / ``<|reasoning_thinking_end|>`` (ids base+120/121).

Our mapping of OpenAI tool calls: CONTENT is the call's ``arguments`` JSON text, verbatim.
:func:`parse_assistant` also accepts CWM's native free-text CONTENT (``<tool: bash>\\nls\\n</tool>``)
and wraps it as ``{PARAM: CONTENT}``, PARAM being the tool's only parameter (else ``input``).

:func:`render_messages` returns :class:`Segment` s whose texts concatenate to the full prompt:
``header`` segments (BOS, role headers) are given, ``assistant`` segments (body + eot) are what SFT
trains on, ``tool`` segments are environment output that RL / trajectory training masks.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
THINK_START, THINK_END = "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"
STOP_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
TOOL_CALL = re.compile(r"<tool:\s*([^>\n]+?)\s*>\n(.*?)\n</tool>", re.DOTALL)
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Segment:
    """A piece of rendered chat text and who produced it (header, system, user, assistant, tool)."""

    role: str
    text: str


def header(role: str) -> str:
    return f"{HEADER_START}{role}{HEADER_END}\n\n"


def content_text(content: Any, where: str) -> str:
    """OpenAI content: a string, None, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"{where}.content: only text parts are supported, got {part!r}")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise ValueError(f"{where}.content must be a string or a list of text parts")


def tools_prompt(tools: Sequence[dict]) -> str:
    """Announce tools in the system prompt, in the layout of CWM's prompting guide."""
    blocks = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        params = json.dumps(fn.get("parameters", {"type": "object", "properties": {}}),
                            ensure_ascii=False)
        blocks.append(f"<tool: {fn['name']}>\n{params}\n</tool>\n{fn.get('description', '')}".rstrip())
    return ("You have access to the following tools. Call one by writing its name and a JSON "
            "object of arguments:\n\n" + "\n\n".join(blocks))


def render_tool_calls(calls: Sequence[dict], where: str) -> str:
    rendered = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ValueError(f"{where}.tool_calls[{j}] needs function.name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        rendered.append(f"<tool: {fn['name']}>\n{args}\n</tool>")
    return "\n".join(rendered)


def assistant_body(message: dict, where: str) -> str:
    body = content_text(message.get("content"), where).strip()
    if message.get("tool_calls"):
        calls = render_tool_calls(message["tool_calls"], where)
        body = f"{body}\n{calls}" if body else calls
    reasoning = message.get("reasoning") or message.get("reasoning_content")
    if reasoning:
        body = f"{THINK_START}{reasoning.strip()}{THINK_END}{body}"
    return body


def render_messages(messages: Sequence[dict], *, tools: Sequence[dict] | None = None,
                    add_generation_prompt: bool = False) -> list[Segment]:
    """Render OpenAI-style ``messages`` as CWM chat segments (see the module docstring)."""
    messages = list(messages)
    if tools:
        if messages and messages[0].get("role") == "system":
            system = content_text(messages[0].get("content"), "messages[0]").strip()
            messages[0] = {"role": "system", "content": f"{system}\n\n{tools_prompt(tools)}"}
        else:
            messages.insert(0, {"role": "system", "content": tools_prompt(tools)})
    segments = [Segment("header", BOS)]
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "assistant":
            for call in message.get("tool_calls") or []:
                call_names[call.get("id", "")] = call.get("function", {}).get("name", "")
            body, title = assistant_body(message, where), "assistant"
        elif role == "tool":
            name = message.get("name") or call_names.get(message.get("tool_call_id", ""))
            if not name:
                raise ValueError(f"{where}: a tool message needs 'name' or a 'tool_call_id' of an "
                                 "earlier assistant tool call")
            body, title = content_text(message.get("content"), where), f"tool: {name}"
        else:
            body, title = content_text(message.get("content"), where).strip(), role
        segments += [Segment("header", header(title)), Segment(role, body + EOT)]
    if add_generation_prompt:
        segments.append(Segment("header", header("assistant")))
    return segments


def render_text(segments: Sequence[Segment]) -> str:
    return "".join(segment.text for segment in segments)


def encode_segments(tokenizer: Any, segments: Sequence[Segment]) -> tuple[list[int], list[str]]:
    """Token ids of the segments, each encoded on its own, and the role of every token."""
    ids: list[int] = []
    roles: list[str] = []
    for segment in segments:
        piece = tokenizer.encode(segment.text)
        ids += piece
        roles += [segment.role] * len(piece)
    return ids, roles


def tool_arguments(name: str, raw: str, tools: Sequence[dict] | None) -> str:
    """JSON arguments for a parsed call: the text itself when it is a JSON object, else wrapped
    under the tool's only parameter (CWM's native free-text calls) or ``input``."""
    try:
        if isinstance(json.loads(raw), dict):
            return raw
    except json.JSONDecodeError:
        pass
    key = "input"
    for tool in tools or []:
        fn = tool.get("function", tool)
        props = list((fn.get("parameters") or {}).get("properties", {}))
        if fn.get("name") == name and len(props) == 1:
            key = props[0]
    return json.dumps({key: raw})


def parse_assistant(text: str, tools: Sequence[dict] | None = None) -> dict[str, Any]:
    """Generated assistant text -> OpenAI message dict (content, tool_calls, reasoning)."""
    for stop in STOP_TEXTS:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    reasoning = None
    if THINK_START in text:
        before, _, rest = text.partition(THINK_START)
        reasoning, closed, after = rest.partition(THINK_END)
        text = before + (after if closed else "")
        reasoning = reasoning.strip()
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": name, "arguments": tool_arguments(name, raw, tools)}}
             for name, raw in TOOL_CALL.findall(text)]
    content = TOOL_CALL.sub("", text).strip()
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message
