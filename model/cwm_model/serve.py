"""An OpenAI-compatible HTTP API for a trained checkpoint (``cwm serve CHECKPOINT``).

Endpoints: ``POST /v1/chat/completions`` (messages, tools, tool calls in the reply),
``POST /v1/completions`` (raw prompts: trace prediction), ``GET /v1/models``, ``GET /health``;
also without the ``/v1`` prefix, as CWM's ``fgserve`` serves them.
Clients that speak to vLLM (the agent policy, evaluation, the neural debugger) use it unchanged,
e.g. ``openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")``.

The chat endpoint applies CWM's chat template (:mod:`cwm_model.chat`), as CWM's own server does
(github.com/facebookresearch/cwm ``serve/fgserve.py``): tools become a plain-text system message
after the last system message, tool calls are ``<tool: NAME>`` blocks, and reasoning is on unless
the request says ``"reasoning": {"enabled": false}`` (or ``chat_template_kwargs.enable_thinking``
false): the generation prompt then ends with ``<think>\n`` and the reply is split at ``</think>``
into ``reasoning_content`` and ``content`` (CWM's ``MODEL_CARD.md``: "reasoning is enabled by
default"). As in CWM, the reasoning system prompt is the client's to send
(``cwm_model.chat.REASONING_SYSTEM_PROMPT``).

``/v1/completions`` takes a text prompt (encoded as ordinary text after ``<|begin_of_text|>``:
special-token spellings in it are text, as in ``fgserve.py``) or a list of token ids (how a trace
prompt with its special tokens is sent, as CWM's ``demos/cwmdbg.py`` does); each choice carries
its generated ``tokens``. A ``stop`` string that names a special token stops at that token, which
the ``tokens`` keep (``cwmdbg.py`` reads frames up to ``<|frame_sep|>``).

Standard library only (``http.server.ThreadingHTTPServer``): one model, generation serialised by
a lock, requests parsed and answered on their own threads. ``stream`` is not supported (400).
:class:`ModelServer` holds the request -> response logic and can be used without HTTP.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

from cwm_model.chat import encode_segments, parse_assistant, render_messages
from cwm_model.checkpoint import load_checkpoint
from cwm_model.generate import generate
from cwm_model.model import CWM
from cwm_model.tokenizer import CWMTokenizer


class RequestError(ValueError):
    """A bad request; the message names the offending field."""


def number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"'{name}' must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of non-empty strings")
    return stop


def reasoning_enabled(body: dict) -> bool:
    """CWM's OpenAI-API default: reasoning on unless the request turns it off."""
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and "enabled" in reasoning:
        return bool(reasoning["enabled"])
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict) and "enable_thinking" in kwargs:
        return bool(kwargs["enable_thinking"])
    return True


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


class ModelServer:
    """Turns OpenAI request bodies into generations from one model."""

    def __init__(self, model: CWM, tokenizer: CWMTokenizer, model_name: str):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.lock = threading.Lock()

    def sampling(self, body: dict, prompt_len: int, default_max: int) -> dict[str, Any]:
        if body.get("stream"):
            raise RequestError("'stream' is not supported by cwm serve; send stream=false")
        room = self.model.config.max_seq_len - prompt_len
        if room < 1:
            raise RequestError(f"prompt has {prompt_len} tokens; the model's context is "
                               f"{self.model.config.max_seq_len}")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"'max_tokens' must be a positive integer, got {max_tokens!r}")
        n = body.get("n") or 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
            raise RequestError(f"'n' must be an integer in [1, 64], got {n!r}")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(f"'seed' must be an integer, got {seed!r}")
        return {"max_new_tokens": min(max_tokens, room), "n": n, "seed": seed,
                "temperature": number(body, "temperature", 1.0, 0.0, 2.0),
                "top_p": number(body, "top_p", 1.0, 1e-6, 1.0)}

    def run(self, prompt: list[int], params: dict, extra_stops: tuple[int, ...] = ()
            ) -> tuple[list[list[int]], list[list[float]]]:
        n = params.pop("n")
        with self.lock:
            rows = generate(self.model, [prompt] * n,
                            stop_ids=(*self.tokenizer.stop_ids, *extra_stops),
                            return_logprobs=True, **params)
        return cast(tuple[list[list[int]], list[list[float]]], rows)  # return_logprobs=True

    def finish(self, ids: list[int], body: dict, extra_stops: tuple[int, ...] = ()
               ) -> tuple[str, str]:
        """Text without a trailing stop token or anything after a stop string; why it ended."""
        if ids and ids[-1] in (*self.tokenizer.stop_ids, *extra_stops):
            ids, reason = ids[:-1], "stop"
        else:
            reason = "length"
        text, by_text = cut_at_stop(self.tokenizer.decode(ids), stop_strings(body))
        return text, "stop" if by_text else reason

    def logprobs(self, ids: list[int], lps: list[float]) -> dict:
        return {"content": [{"token": self.tokenizer.decode([t]), "logprob": lp,
                             "bytes": list(self.tokenizer.decode([t]).encode()), "top_logprobs": []}
                            for t, lp in zip(ids, lps)]}

    def chat_prompt(self, body: dict) -> tuple[list[int], list | None, bool]:
        """Prompt ids (CWM's template), the tools, and whether reasoning is on."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list")
        tools = body.get("tools") if body.get("tool_choice") != "none" else None
        think = reasoning_enabled(body)
        try:
            segments = render_messages(messages, tools=tools, add_generation_prompt=True,
                                       think=think)
        except ValueError as err:
            raise RequestError(str(err)) from None
        return encode_segments(self.tokenizer, segments)[0], tools, think

    def chat(self, body: dict) -> dict:
        prompt, tools, think = self.chat_prompt(body)
        outputs, lps = self.run(prompt, self.sampling(body, len(prompt), default_max=1024))
        choices = []
        for i, (ids, lp) in enumerate(zip(outputs, lps)):
            text, reason = self.finish(ids, body)
            message = parse_assistant(text, tools, think=think)
            if message.get("tool_calls"):
                reason = "tool_calls"
            choice = {"index": i, "message": message, "finish_reason": reason}
            if body.get("logprobs"):
                choice["logprobs"] = self.logprobs(ids, lp)
            choices.append(choice)
        return self.envelope("chat.completion", choices, len(prompt), outputs)

    def complete(self, body: dict) -> dict:
        choices: list[dict[str, Any]] = []
        used, produced = 0, []
        stops = self.stop_token_ids(body)
        for prompt in self.completion_prompts(body.get("prompt")):
            outputs, _ = self.run(prompt, self.sampling(body, len(prompt), default_max=16),
                                  extra_stops=stops)
            used += len(prompt)
            produced += outputs
            for ids in outputs:
                completion, reason = self.finish(ids, body, extra_stops=stops)
                choices.append({"index": len(choices), "text": completion, "tokens": ids,
                                "logprobs": None, "finish_reason": reason})
        return self.envelope("text_completion", choices, used, produced)

    def completion_prompts(self, prompt: Any) -> list[list[int]]:
        """A string, a list of strings, a list of token ids, or a list of such lists."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("'prompt' must be a string, a list of token ids, or a non-empty "
                               "list of either")
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append(self.tokenizer.encode(item, bos=True))
            elif (isinstance(item, list) and item and all(
                    isinstance(t, int) and not isinstance(t, bool)
                    and 0 <= t < self.tokenizer.vocab_size for t in item)):
                prompts.append(list(item))
            else:
                raise RequestError("'prompt': each prompt must be a string or a non-empty list of "
                                   f"token ids below {self.tokenizer.vocab_size}")
        return prompts

    def stop_token_ids(self, body: dict) -> tuple[int, ...]:
        """The ids of ``stop`` strings that name a special token (``"<|frame_sep|>"``)."""
        ids = []
        for text in stop_strings(body):
            token = self.tokenizer.tokenizer.token_to_id(text)
            if token is not None and token in self.tokenizer.special_ids:
                ids.append(token)
        return tuple(ids)

    def envelope(self, kind: str, choices: list, prompt_tokens: int, outputs: list) -> dict:
        completion_tokens = sum(len(o) for o in outputs)
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": 0, "owned_by": "cwm-pipeline"}]}


def versioned(path: str) -> str:
    """The route of a request path: CWM's own server (``serve/fgserve.py``) and its debugger
    use ``/completions`` and ``/chat/completions`` without ``/v1``; both are accepted."""
    path = path.split("?")[0].rstrip("/")
    return path if path.startswith("/v1/") or path == "/health" else "/v1" + path


def make_handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    """The HTTP edge: JSON in, JSON out, OpenAI-shaped errors."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def send_json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self.send_json(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = versioned(self.path)
            if path == "/health":
                self.send_json(200, {"status": "ok"})
            elif path == "/v1/models":
                self.send_json(200, server.models())
            else:
                self.error(404, f"no route GET {self.path}")

        def do_POST(self) -> None:  # noqa: N802
            routes = {"/v1/chat/completions": server.chat, "/v1/completions": server.complete}
            route = routes.get(versioned(self.path))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if route is None:
                return self.error(404, f"no route POST {self.path}")
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise RequestError("request body must be a JSON object")
                self.send_json(200, route(body))
            except (RequestError, json.JSONDecodeError) as err:
                self.error(400, str(err))
            except Exception as err:  # the server must outlive one failed request
                self.error(500, f"{type(err).__name__}: {err}", "server_error")

        def log_message(self, fmt: str, *args: Any) -> None:
            print(f"{self.address_string()} {fmt % args}", flush=True)

    return Handler


def build_server(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str | None = None) -> ThreadingHTTPServer:
    model, tokenizer, _ = load_checkpoint(checkpoint)
    if tokenizer is None:
        raise ValueError(f"checkpoint {checkpoint} has no tokenizer.json; serving needs one")
    app = ModelServer(model, tokenizer, model_name or Path(checkpoint).resolve().name)
    httpd = ThreadingHTTPServer((host, port), make_handler(app))
    httpd.daemon_threads = True
    return httpd


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000,
          model_name: str | None = None) -> None:
    httpd = build_server(checkpoint, host, port, model_name)
    bound_host, bound_port = httpd.server_address[:2]
    if isinstance(bound_host, bytes):
        bound_host = bound_host.decode()
    print(f"cwm serve: listening on http://{bound_host}:{bound_port}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
