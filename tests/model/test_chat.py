"""CWM chat rendering and parsing of assistant output."""

from __future__ import annotations

import json

import pytest

from cwm_model.chat import Segment, encode_segments, parse_assistant, render_messages, render_text

TOOLS = [{"type": "function", "function": {
    "name": "bash", "description": "Run a command.",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful AI assistant."},
    {"role": "user", "content": "  Fix the bug.  "},
    {"role": "assistant", "content": "Let me look.", "reasoning": "Check the tests first.",
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "bash", "arguments": '{"command": "pytest -q"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "1 failed\n"},
    {"role": "assistant", "content": "Done."},
]


def test_rendering_follows_cwm_chat_format():
    segments = render_messages(CONVERSATION)
    text = render_text(segments)
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful AI assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nFix the bug.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "<|reasoning_thinking_start|>Check the tests first.<|reasoning_thinking_end|>"
        'Let me look.\n<tool: bash>\n{"command": "pytest -q"}\n</tool><|eot_id|>'
        "<|start_header_id|>tool: bash<|end_header_id|>\n\n1 failed\n<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nDone.<|eot_id|>")
    assert [s.role for s in segments] == ["header", "header", "system", "header", "user",
                                          "header", "assistant", "header", "tool", "header",
                                          "assistant"]
    assert all(s.text.endswith("<|eot_id|>") for s in segments if s.role != "header")


def test_generation_prompt_and_tools_announced_in_the_system_prompt():
    segments = render_messages([{"role": "user", "content": "hi"}], tools=TOOLS,
                               add_generation_prompt=True)
    assert segments[-1] == Segment("header", "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert segments[2].role == "system" and "<tool: bash>" in segments[2].text
    merged = render_messages(CONVERSATION[:2], tools=TOOLS)
    assert merged[2].text.startswith("You are a helpful AI assistant.\n\nYou have access")


def test_segments_tokenise_to_roles(tokenizer):
    ids, roles = encode_segments(tokenizer, render_messages(CONVERSATION))
    assert len(ids) == len(roles) and ids[0] == tokenizer.bos_id
    assistant = [i for i, r in zip(ids, roles) if r == "assistant"]
    assert tokenizer.token_id("<|reasoning_thinking_start|>") in assistant
    assert tokenizer.decode(ids) == render_text(render_messages(CONVERSATION))


def test_parse_assistant_round_trips_tool_calls_and_reasoning():
    body = render_text(render_messages(CONVERSATION[2:3]))
    body = body.split("<|end_header_id|>\n\n", 1)[1]
    message = parse_assistant(body)
    assert message["content"] == "Let me look."
    assert message["reasoning_content"] == "Check the tests first."
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "bash", "arguments": '{"command": "pytest -q"}'}


def test_parse_assistant_accepts_cwm_native_free_text_calls():
    message = parse_assistant("<tool: bash>\nls -la\n</tool><|eot_id|>trailing", TOOLS)
    assert message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"command": "ls -la"}
    assert json.loads(parse_assistant("<tool: edit>\nx\n</tool>")["tool_calls"][0]["function"]
                      ["arguments"]) == {"input": "x"}
    assert parse_assistant("plain answer<|eot_id|>") == {"role": "assistant",
                                                         "content": "plain answer"}


def test_bad_messages_name_the_field():
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        render_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\]: a tool message"):
        render_messages([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"tool_calls\[0\]"):
        render_messages([{"role": "assistant", "tool_calls": [{"function": {}}]}])
