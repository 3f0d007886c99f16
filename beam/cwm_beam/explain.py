"""Explained traces: a model rewrites a trace as a step-by-step natural-language explanation, and
the explanation is kept only if the output it states is the output the tracer recorded.

CWM's mid-training data includes natural-language rewrites of its execution traces
(../shared/MISSION.md). A model asked to explain a trace can still get the result wrong, so the
rewrite is checked against the one fact we hold for certain, the traced return value: the
explanation must end with a line ``Output: <python literal>`` whose value equals the traced
``return`` (:func:`verdict`). Everything else about the explanation is the model's.

The model is any OpenAI-compatible chat endpoint (vLLM, SGLang, ``cwm serve``) through the
``openai`` client. :class:`ExplainTraces` is the Beam transform: trace records in; explained
records out, and each trace's :data:`Verdict` (kept, or why not) for the manifest's counts.
Only traces of calls that returned are explained (a raised exception or a truncated trace has no
output to check against); the others are counted as ``skipped``.

Pure parts (prompt, parsing, verdict) are functions; the endpoint is reached only in
:class:`ExplainFn`, a few requests at a time (``concurrency``) per bundle.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Literal

import apache_beam as beam
import openai

SYSTEM = ("You explain how a Python function executes, step by step, in plain English. "
          "Follow the trace you are given. End with one line of the form "
          "`Output: <value>`, the value the call returns, as a Python literal.")
MAX_TRACE_LINES = 60  # steps shown to the model; longer traces are cut with a note
KEPT: Final = "kept"
Verdict = Literal["kept", "wrong_output", "no_output_line", "endpoint_error", "skipped"]
VERDICTS: tuple[Verdict, ...] = ("kept", "wrong_output", "no_output_line", "endpoint_error",
                                 "skipped")
_OUTPUT_LINE = re.compile(r"^\W*output\W*:\s*(?P<value>.+?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ExplainSettings:
    """Where the explaining model is and how to ask it."""

    endpoint: str            # base URL of an OpenAI-compatible API, e.g. http://host:8000/v1
    model: str
    api_key: str = "EMPTY"   # from the environment of the step, never from the spec
    max_tokens: int = 512
    temperature: float = 0.0
    concurrency: int = 4     # requests in flight per bundle
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"explain.endpoint {self.endpoint!r}: an http(s) base URL")
        if not self.model:
            raise ValueError("explain.model is required")
        if self.concurrency < 1 or self.max_tokens < 1:
            raise ValueError("explain.concurrency and explain.maxTokens must be >= 1")


def explainable(record: dict[str, Any]) -> bool:
    """Only a call that returned, traced to the end, has an output to check against."""
    return record.get("exception") is None and not record.get("truncated") \
        and record.get("return") is not None


def trace_steps(frames: list[dict[str, Any]], limit: int = MAX_TRACE_LINES) -> str:
    """The trace as numbered steps: the line about to run and the locals that changed (``..``:
    unchanged, as in CWM's format)."""
    lines = []
    for i, frame in enumerate(frames[:limit]):
        changed = {k: v for k, v in (frame.get("locals") or {}).items() if v != ".."}
        state = ", ".join(f"{k} = {v}" for k, v in changed.items()) or "no change"
        event = frame.get("event", "line")
        code = (frame.get("line") or "").rstrip()
        suffix = f" -> {frame['value']}" if frame.get("value") is not None else ""
        lines.append(f"{i + 1}. [{event}] {code.strip()}  ({state}){suffix}")
    if len(frames) > limit:
        lines.append(f"... {len(frames) - limit} more steps")
    return "\n".join(lines)


def prompt(record: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages that ask for one trace's explanation (pure)."""
    user = (f"Function:\n```python\n{record['code']}\n```\n"
            f"Call: {record['entry']}({record['input']})\n\n"  # CRUXEval inputs: the argument list
            f"Execution trace:\n{trace_steps(record.get('frames') or [])}\n\n"
            "Explain the execution step by step, then give the `Output:` line.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def stated_output(text: str) -> str | None:
    """The value of the explanation's last ``Output:`` line (markdown's backticks and bold
    stripped), or None."""
    for line in reversed(text.strip().splitlines()):
        match = _OUTPUT_LINE.match(line)
        if match:
            return match.group("value").strip(" `*") or None
    return None


def _literal(text: str) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def same_value(stated: str, traced: str) -> bool:
    """Whether the stated output is the traced one: equal Python literals of the same type
    (``1 == True`` does not count), or, where the traced value is not a literal (an object's
    repr), the same text."""
    ok_traced, want = _literal(traced)
    if not ok_traced:
        return stated.strip() == traced.strip()
    ok_stated, got = _literal(stated)
    return ok_stated and type(got) is type(want) and got == want and repr(got) == repr(want)


def verdict(explanation: str, record: dict[str, Any]) -> Verdict:
    """Kept, or why not (pure)."""
    stated = stated_output(explanation)
    if stated is None:
        return "no_output_line"
    return KEPT if same_value(stated, record["return"]) else "wrong_output"


def explained_record(record: dict[str, Any], explanation: str, model: str) -> dict[str, Any]:
    """The record an explanation becomes: the program, the call, the checked output and the
    explanation (training data as chat messages: the prompt's question, the explanation)."""
    question = prompt(record)[1]["content"]
    return {"id": record["id"], "source": record["source"],
            "program_hash": record["program_hash"], "code": record["code"],
            "entry": record["entry"], "input": record["input"], "return": record["return"],
            "explanation": explanation, "model": model,
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": explanation}]}


def explanation_text(message: Any) -> str:
    """The reply's explanation: a reasoning model's reasoning (``reasoning_content``, as vLLM and
    ``cwm serve`` split it off at ``</think>``) followed by its answer."""
    extra = getattr(message, "model_extra", None) or {}
    reasoning = extra.get("reasoning_content") or ""
    answer = message.content or ""
    return f"{reasoning.strip()}\n{answer.strip()}".strip() if reasoning else answer


class ExplainFn(beam.DoFn):
    """Asks the endpoint for each explainable record's explanation, ``concurrency`` at a time;
    emits ``(verdict, record)``: the explained record when kept, the trace's id otherwise."""

    def __init__(self, settings: ExplainSettings) -> None:
        self.settings = settings
        self.client: openai.OpenAI | None = None

    def setup(self) -> None:
        s = self.settings
        self.client = openai.OpenAI(base_url=s.endpoint, api_key=s.api_key, timeout=s.timeout,
                                    max_retries=2)

    def _ask(self, record: dict[str, Any]) -> tuple[Verdict, dict[str, Any]]:
        if not explainable(record):
            return "skipped", {"id": record["id"]}
        s = self.settings
        assert self.client is not None, "setup() runs before process()"
        try:
            reply = self.client.chat.completions.create(
                model=s.model, messages=prompt(record),  # type: ignore[arg-type]
                max_tokens=s.max_tokens, temperature=s.temperature)
        except openai.OpenAIError as err:
            return "endpoint_error", {"id": record["id"], "detail": str(err)[:500]}
        text = explanation_text(reply.choices[0].message)
        kind = verdict(text, record)
        if kind != KEPT:
            return kind, {"id": record["id"], "stated": stated_output(text)}
        return KEPT, explained_record(record, text, s.model)

    def process(self, batch: list[dict[str, Any]]) -> Iterator[tuple[Verdict, dict[str, Any]]]:
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            yield from pool.map(self._ask, batch)


class ExplainTraces(beam.PTransform):
    """Trace records in; ``(verdict, record)`` pairs out (see :class:`ExplainFn`). Split them
    with :func:`kept` and count them with :func:`count_verdicts`."""

    def __init__(self, settings: ExplainSettings) -> None:
        super().__init__()
        self.settings = settings

    def expand(self, records):
        size = self.settings.concurrency * 2
        return (records
                | "BatchForEndpoint" >> beam.BatchElements(min_batch_size=1,
                                                           max_batch_size=size)
                | "Explain" >> beam.ParDo(ExplainFn(self.settings)))


def kept(pairs: Iterable[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The explained records among verdict pairs (pure)."""
    return [record for kind, record in pairs if kind == KEPT]


def count_verdicts(pairs: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Every verdict's count, zeros included, for the manifest (pure)."""
    counts: dict[str, int] = dict.fromkeys(VERDICTS, 0)
    for kind, _ in pairs:
        counts[kind] += 1
    return counts
