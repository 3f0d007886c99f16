"""``cwm serve``: the official ``openai`` client talks to a trained checkpoint over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.model.memorised import BASH_TOOL, CHAT_PROMPT, COMPLETION_PROMPT, THINK_PROMPT
from tests.model.serving import serving

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # a trained model / transformers import: seconds each


@pytest.fixture(scope="module")
def server(trained_checkpoint):
    """``python -m cwm_model.cli serve`` on a free port; yields its base URL."""
    with serving(trained_checkpoint, "cwm-debug") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_returns_the_models_tool_call(client):
    reply = client.chat.completions.create(model="cwm-debug", messages=CHAT_PROMPT,
                                           tools=[BASH_TOOL], temperature=0, max_tokens=40,
                                           extra_body={"reasoning": {"enabled": False}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "bash"
    assert json.loads(call.function.arguments) == {"command": "ls -la"}
    assert reply.usage.prompt_tokens > 100 and reply.usage.completion_tokens > 5
    assert reply.model == "cwm-debug"


def test_reasoning_is_on_by_default_and_split_from_the_answer(client):
    """CWM's template: the prompt ends with "<think>\\n", the reply's reasoning is split off at
    "</think>" (fgserve.py), and the tool call after it is parsed from CWM's plain body."""
    reply = client.chat.completions.create(model="cwm-debug", messages=THINK_PROMPT,
                                           temperature=0, max_tokens=60)
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] == "The user wants a listing."
    (call,) = message.tool_calls
    assert json.loads(call.function.arguments) == {"command": "ls -la"}


def test_completion_takes_token_ids_and_stops_at_a_special_token(client, server, tokenizer):
    """The neural debugger's protocol (cwmdbg.py): a prompt of ids, a special-token stop."""
    prompt = tokenizer.encode(COMPLETION_PROMPT, bos=True)
    body = json.dumps({"model": "cwm-debug", "prompt": prompt, "max_tokens": 20,
                       "temperature": 0, "stop": "<|end_of_text|>"}).encode()
    # As CWM's cwmdbg.py posts it: /completions without /v1.
    request = urllib.request.Request(server.removesuffix("/v1") + "/completions", data=body,
                                     method="POST",
                                     headers={"Content-Type": "application/json"})
    choice = json.loads(urllib.request.urlopen(request).read())["choices"][0]
    assert choice["text"] == "    return a + b\n"
    assert choice["tokens"] == tokenizer.encode("    return a + b\n") + [tokenizer.eos_id]


def test_completion_returns_the_models_continuation(client):
    reply = client.completions.create(model="cwm-debug", prompt=COMPLETION_PROMPT, max_tokens=20,
                                      temperature=0)
    assert reply.choices[0].text == "    return a + b\n"
    assert reply.choices[0].finish_reason == "stop"
    short = client.completions.create(model="cwm-debug", prompt=COMPLETION_PROMPT, max_tokens=2,
                                      temperature=0, n=2)
    assert [c.finish_reason for c in short.choices] == ["length", "length"]


def test_models_listing_and_errors(client, server):
    assert [m.id for m in client.models.list()] == ["cwm-debug"]
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="cwm-debug", messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="cwm-debug", prompt="x", temperature=5)
    request = urllib.request.Request(server + "/nothing", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 404
