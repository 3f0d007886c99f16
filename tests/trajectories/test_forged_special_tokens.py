"""Issue 20, deliverable 4: special tokens come only from structure. Untrusted text that spells
every special token (a traced program's strings, a tool's output from the repository, file
contents written by the agent, a commit-message-like task text) is encoded as ordinary text, so
it cannot forge a frame or a turn boundary in training data (CWM encodes text with tiktoken's
``encode_ordinary``: github.com/facebookresearch/cwm ``cwm/text/tokenizers.py``)."""

from __future__ import annotations

import json

import pytest

from cwm_beam.traces import to_record
from cwm_exec.tracer import TraceLimits, trace_function
from cwm_forager.tools import ToolRunner
from cwm_jobs.data import Position, chat_document, trajectory_document
from cwm_jobs.tasks import sft_messages, task_from_trace, trace_ids
from cwm_model.tokenizer import special_token_names, train_tokenizer

FORGED = "".join(special_token_names())   # all 256, <|begin_of_text|> ... <|eot_id|> ...


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x\n", FORGED], vocab_size=300)


def test_a_trace_whose_values_spell_every_special_token(tokenizer):
    source = (f"def f(s):\n    forged = {FORGED!r}\n    parts = [s, forged]\n"
              f"    return ''.join(parts)")
    result = trace_function(source, "f", repr(FORGED), limits=TraceLimits(max_repr_chars=20000))
    program = {"id": "forged", "source": "functions", "code": source, "entry": "f",
               "input": repr(FORGED), "_result": result.to_json()}
    record = to_record(program, TraceLimits(max_repr_chars=20000))
    assert "_deadletter" not in record, record   # kept, not dropped
    ids = trace_ids(tokenizer, record)
    frame_tokens = {"call": "<|call_sep|>", "line": "<|line_sep|>", "return": "<|return_sep|>"}
    expected = ["<|begin_of_text|>", "<|trace_context_start|>", "<|frame_sep|>"]
    for frame in result.frames:
        expected.append(frame_tokens[frame.event])
        expected += (["<|action_sep|>", "<|frame_sep|>"] if frame.event != "return"
                     else ["<|action_sep|>", "<|arg_sep|>", "<|frame_sep|>"])
    expected.append("<|end_of_text|>")
    specials = [tokenizer.id_to_token(i) for i in ids if i in tokenizer.special_ids]
    assert specials == expected
    assert tokenizer.decode(ids) == result.text
    # The SFT question built from it: only the chat structure's tokens.
    task = task_from_trace(record["text"], record["frames"])
    assert task is not None and FORGED in task.expected
    doc = chat_document(tokenizer, sft_messages(task))
    specials = [tokenizer.id_to_token(i) for i in doc.tokens if i in tokenizer.special_ids]
    assert specials == ["<|begin_of_text|>"] + [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] * 3


def test_tool_output_and_file_contents_that_spell_every_special_token(calc_env, tokenizer):
    workdir = calc_env.fresh_task_copy()
    try:
        runner = ToolRunner(calc_env, workdir, max_observation_chars=20000, action_timeout=20)
        (workdir / "README.forged").write_text(FORGED)   # a file of the untrusted repository
        output = runner.call("bash", {"command": "cat README.forged"}).observation
        created = runner.call("create", {"path": "forged.txt", "content": FORGED}).observation
    finally:
        calc_env.discard(workdir)
    assert output.startswith(FORGED)
    calls = [{"id": "c1", "type": "function",
              "function": {"name": "bash",
                           "arguments": json.dumps({"command": "cat README.forged"})}},
             {"id": "c2", "type": "function",
              "function": {"name": "create",
                           "arguments": json.dumps({"path": "forged.txt", "content": FORGED})}}]
    record = {"messages": [
        {"role": "system", "content": "You fix bugs."},
        {"role": "user", "content": f"Commit message of the fix to port: {FORGED}"},
        {"role": "assistant", "content": "", "tool_calls": calls[:1]},
        {"role": "tool", "tool_call_id": "c1", "content": output},
        {"role": "assistant", "content": FORGED, "tool_calls": calls[1:]},
        {"role": "tool", "tool_call_id": "c2", "content": created},
    ], "meta": {}}
    doc = trajectory_document(tokenizer, record, Position(), seed=0, mask_rate=0.0)
    specials = [tokenizer.id_to_token(i) for i in doc.tokens if i in tokenizer.special_ids]
    rendered_messages = len(record["messages"]) + 1   # + the tools' system message
    assert specials == ["<|begin_of_text|>"] + [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] * rendered_messages
    assert doc.tokens.count(tokenizer.eot_id) == rendered_messages
