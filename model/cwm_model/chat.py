"""OpenAI-style messages <-> CWM's chat format.

Each rule and the CWM file it comes from (github.com/facebookresearch/cwm):

* Messages (``PROMPTING_GUIDE.md`` "Chat Format"; ``cwm/text/tokenizers.py``
  ``CWMInstructTokenizer.encode_message`` / ``encode_message_header`` / ``encode_prompt_dialog``):
  ``<|begin_of_text|>`` once, then per message ``<|start_header_id|>ROLE<|end_header_id|>``,
  ``\n\n`` (encoded on its own), the body, ``<|eot_id|>``; ROLE is ``system``, ``user``,
  ``assistant`` or ``tool: NAME`` (``cwm/text/datatypes.py`` ``CWMChatMessage.source_str``).
  Bodies are stripped, except tool output. The generation prompt is the assistant header.
* Reasoning (``PROMPTING_GUIDE.md`` "Reasoning"; ``cwm/rl/envs/prompts.py``): plain text. The
  system prompt starts with :data:`REASONING_SYSTEM_PROMPT`, the generation prompt ends with
  ``<think>\n``, the reply is ``REASONING\n</think>\nANSWER``; ``serve/fgserve.py`` splits a reply
  at ``\n</think>\n`` into ``reasoning_content`` and ``content``. A past assistant turn with
  ``reasoning_content`` (even ``""``) is rendered ``<think>\nREASONING\n</think>\nANSWER``.
* Tools (``PROMPTING_GUIDE.md`` "Tool Use"; ``serve/tools.py``; ``cwm/rl/envs/envs/swerl_tool.py``
  ``SYSTEM_UBUNTU``): a call is ``<tool: NAME>\nBODY\n</tool>`` in the assistant's text. The tools
  are announced as plain-text command descriptions in their own system message after the last
  system message (``fgserve.py`` + ``serve/tools.py`` ``prepare_tools``): ``bash`` (BODY: the
  command), ``edit`` (BODY: a path, then one SEARCH/REPLACE block), ``create`` (BODY: a path, a
  newline, the content), ``submit`` (BODY: the result, a path to a diff for repository tasks);
  any other tool is described with its JSON schema and takes JSON (``FunctionTool``).

An OpenAI tool call's ``arguments`` JSON maps to BODY and back (:func:`call_body`,
:func:`call_arguments`): bash ``{"command"}``, edit ``{"path", "search", "replace"}``, create
``{"path", "content"}``, submit ``{"path"}``.

Special tokens come from structure only: :func:`render_messages` returns :class:`Segment` s,
each either one special token (``special=True``) or ordinary text, so a body that spells
``<|eot_id|>`` is encoded as text (CWM encodes bodies with ``encode_ordinary``). ``header``
segments (and a reasoning reply's leading ``<think>\n``, the generation prompt) are given,
``assistant`` segments (body + eot) are what SFT trains on, ``tool`` segments are environment
output that RL / trajectory training masks.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
THINK_START, THINK_END = "<think>\n", "</think>"
STOP_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
TOOL_CALL = re.compile(r"(?:^|\n)<tool: (\w+)>\n(.*?)\n</tool>", re.DOTALL)
SEARCH_REPLACE = re.compile(
    r"(.*)\n<<<<<<< SEARCH\n([\s\S]*?)\n=======\n([\s\S]*?)\n>>>>>>> REPLACE")
ROLES = ("system", "user", "assistant", "tool")

#: ``cwm/rl/envs/prompts.py`` ``CWM_THINKTAG_SYS_PROMPT`` with CWM's default description.
REASONING_SYSTEM_PROMPT = ("You are a helpful AI assistant. You always reason before responding, "
                           "using the following format:\n\n<think>\nyour internal reasoning\n"
                           "</think>\nyour external response")

#: Plain-text specs of CWM's native tools (``serve/tools.py``; ``swerl_tool.py`` ``SYSTEM_UBUNTU``).
NATIVE_TOOL_SPECS = {
    "bash": "<tool: bash>\n[command(s)]\n</tool>\nExecutes bash command(s) [command(s)] in the "
            "current session. [command(s)] can be any non-interactive bash command(s), either "
            "single or multi-line.",
    "edit": "<tool: edit>\n[path]\n<<<<<<< SEARCH\n[search_lines]\n=======\n[replacement_lines]\n"
            ">>>>>>> REPLACE\n</tool>\nReplaces [search_lines] from [path] with "
            "[replacement_lines], where [path] must exist and [search_lines] must uniquely and "
            "exactly match one or more consecutive lines from the original file, including "
            "indentations and whitespaces.",
    "create": "<tool: create>\n[path]\n[content]\n</tool>\nCreates a new file at [path] with "
              "[content], where [path] must not exist, but its parent directory must exist.",
    "submit": "<tool: submit>\n[result]\n</tool>\nMarks [result] as your final submission. The "
              "meaning and format of [result] depends on the specific user request.",
}


@dataclass(frozen=True)
class Segment:
    """A piece of rendered chat and who produced it (header, system, user, assistant, tool):
    one special token when ``special``, else ordinary text."""

    role: str
    text: str
    special: bool = False


def header(role: str) -> list[Segment]:
    """``<|start_header_id|>ROLE<|end_header_id|>`` + ``\\n\\n`` (CWM encodes each on its own)."""
    return [Segment("header", HEADER_START, True), Segment("header", role),
            Segment("header", HEADER_END, True), Segment("header", "\n\n")]


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


def tool_function(tool: Any, where: str) -> dict:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not fn.get("name"):
        raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}}")
    return fn


def describe_tool(fn: dict) -> str:
    """A tool's spec: CWM's own text for its native tools, else ``serve/tools.py``'s
    ``FunctionTool.describe`` layout (JSON parameters)."""
    if fn["name"] in NATIVE_TOOL_SPECS:
        return NATIVE_TOOL_SPECS[fn["name"]]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    text = f"<tool: {fn['name']}>\n[json params]\n</tool>"
    if fn.get("description"):
        text += f"\n{fn['description']}\n"
    text += "\nParameters must respect the following schema: " + json.dumps(params, indent=2)
    if params.get("required"):
        text += f"\nRequired parameters: {', '.join(params['required'])}\n"
    return text


def tools_prompt(tools: Sequence[dict]) -> str:
    """The system message announcing ``tools`` (``serve/tools.py`` ``prepare_tools``)."""
    specs = [describe_tool(tool_function(t, f"tools[{i}]")) for i, t in enumerate(tools)]
    return ("You have access to the following tools:\n" + "\n\n".join(specs)).strip()


def call_body(name: str, arguments: Any, where: str) -> str:
    """An OpenAI call's arguments as CWM's plain-text call body."""
    if isinstance(arguments, str):
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments if name not in NATIVE_TOOL_SPECS else _bad(where, arguments)
    else:
        args = arguments or {}
    if name not in NATIVE_TOOL_SPECS:
        return arguments if isinstance(arguments, str) else json.dumps(args)
    try:
        if name == "bash":
            return args["command"]
        if name == "edit":
            return (f"{args['path']}\n<<<<<<< SEARCH\n{args['search']}\n=======\n"
                    f"{args['replace']}\n>>>>>>> REPLACE")
        if name == "create":
            return f"{args['path']}\n{args['content']}"
        return args["path"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: {name} call arguments lack {err}") from None


def _bad(where: str, arguments: str) -> str:
    raise ValueError(f"{where}: arguments are not a JSON object: {arguments[:80]!r}")


def call_arguments(name: str, body: str) -> str | None:
    """A CWM call body as OpenAI ``arguments`` JSON (None when an edit has no SEARCH/REPLACE
    block); inverse of :func:`call_body`."""
    if name == "bash":
        return json.dumps({"command": body})
    if name == "edit":
        found = SEARCH_REPLACE.findall(body)
        if len(found) != 1:
            return None
        path, search, replace = found[0]
        return json.dumps({"path": path, "search": search, "replace": replace})
    if name == "create":
        path, _, content = body.partition("\n")
        return json.dumps({"path": path, "content": content})
    if name == "submit":
        return json.dumps({"path": body.strip()})
    return body.strip()


def assistant_body(message: dict, where: str) -> str:
    body = content_text(message.get("content"), where).strip()
    calls = []
    for j, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ValueError(f"{where}.tool_calls[{j}] needs function.name")
        text = call_body(fn["name"], fn.get("arguments", "{}"), f"{where}.tool_calls[{j}]")
        calls.append(f"<tool: {fn['name']}>\n{text}\n</tool>")
    if calls:
        body = "\n".join([body, *calls] if body else calls)
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        reasoning = message.get("reasoning")
    if reasoning is not None:   # "" too: a reasoning-mode reply that closed its reasoning at once
        body = f"{THINK_START}{reasoning.strip()}\n{THINK_END}\n{body}"
    return body


def render_messages(messages: Sequence[dict], *, tools: Sequence[dict] | None = None,
                    add_generation_prompt: bool = False, think: bool = False) -> list[Segment]:
    """Render OpenAI-style ``messages`` as CWM chat segments (see the module docstring);
    ``think`` ends the generation prompt with ``<think>\\n``."""
    messages = list(messages)
    if tools:
        last_system = max((i for i, m in enumerate(messages)
                           if isinstance(m, dict) and m.get("role") == "system"), default=-1)
        messages.insert(last_system + 1, {"role": "system", "content": tools_prompt(tools)})
    segments = [Segment("header", BOS, True)]
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
        segments += header(title)
        if role == "assistant" and body.startswith(THINK_START):
            # "<think>\n" is the reasoning-mode generation prompt: given, encoded on its own.
            segments.append(Segment("header", THINK_START))
            body = body[len(THINK_START):]
        if body:
            segments.append(Segment(role, body))
        segments.append(Segment(role, EOT, True))
    if add_generation_prompt:
        segments += header("assistant")
        if think:
            segments.append(Segment("header", THINK_START))
    return segments


def render_text(segments: Sequence[Segment]) -> str:
    return "".join(segment.text for segment in segments)


def encode_segments(tokenizer: Any, segments: Sequence[Segment]) -> tuple[list[int], list[str]]:
    """Token ids of the segments (a special one is its token, others ordinary text, each encoded
    on its own) and the role of every token."""
    ids: list[int] = []
    roles: list[str] = []
    for segment in segments:
        piece = tokenizer.encode_parts([(segment.text, segment.special)])
        ids += piece
        roles += [segment.role] * len(piece)
    return ids, roles


def parse_assistant(text: str, tools: Sequence[dict] | None = None, *,
                    think: bool = False) -> dict[str, Any]:
    """Generated assistant text -> OpenAI message dict (content, tool_calls, reasoning).

    ``think``: the prompt ended with ``<think>\\n``, so the text is
    ``REASONING\\n</think>\\nANSWER``
    (split as ``fgserve.py`` does); a reply that never closed its reasoning has no answer."""
    for stop in STOP_TEXTS:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    reasoning = None
    if think or text.startswith(THINK_START):
        body = text.removeprefix(THINK_START)
        reasoning, closed, after = body.partition(THINK_END)
        text = after if closed else ""
        reasoning = reasoning.strip()
    calls = []
    for name, body in TOOL_CALL.findall(text):
        arguments = call_arguments(name, body)
        if arguments is not None:
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": name, "arguments": arguments}})
    content = TOOL_CALL.sub("", text).strip()
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message
