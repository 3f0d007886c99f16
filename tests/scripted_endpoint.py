"""A local OpenAI-compatible endpoint that a test scripts: the tests of the model-backed parts
(the OpenAI policy, explained traces, the environment advisor, issue texts) talk to it through
the real ``openai`` client, so what they check is the wire protocol, not a mocked call.

A test subclasses :class:`JSONHandler` with its ``do_POST`` (and ``do_GET``), answers with
:meth:`JSONHandler.send_json` (:func:`chat_reply` builds a chat completion) and runs it with
:func:`serving`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class JSONHandler(BaseHTTPRequestHandler):
    def read_json(self) -> dict[str, Any]:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # one line per request would bury the test's output
        return None


def chat_reply(content: str, model: str = "scripted", **usage: int) -> dict[str, Any]:
    """A chat completion whose one choice is ``content`` as the assistant's text."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, **usage}}


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], **state: Any) -> Iterator[ThreadingHTTPServer]:
    """``handler`` served on a free loopback port in a thread; ``state`` set as attributes of the
    server (``self.server.<name>`` in the handler). :func:`base_url` is its ``/v1`` address."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in state.items():
        setattr(httpd, name, value)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def base_url(httpd: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{httpd.server_port}/v1"
