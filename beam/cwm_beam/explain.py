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
output to check against); the others are counted as ``skipped``. :class:`ExplainSample` puts the
spec's ``fraction`` and ``maxRecords`` in front of it (the traces step's ``data.traces.explain``,
:mod:`cwm_beam.traces`).

The API key is read from the environment variable the settings name (``api_key_env``) in the
process that asks (:meth:`ExplainFn.setup`, :func:`check_endpoint`), never stored in the settings:
the pipeline's pickled graph, which a distributed runner ships to its workers, holds no key.

Pure parts (prompt, parsing, verdict, sampling) are functions; the endpoint is reached only in
:func:`check_endpoint` and :class:`ExplainFn`, a few requests at a time (``concurrency``) per
bundle.
"""

from __future__ import annotations

import ast
import hashlib
import os
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
# endpoint_error: no answer (connection refused, timeout, a 5xx); request_refused: the endpoint
# answered with a 4xx (a prompt longer than the model's context, say) for this request.
Verdict = Literal["kept", "wrong_output", "no_output_line", "endpoint_error", "request_refused",
                  "skipped"]
VERDICTS: tuple[Verdict, ...] = ("kept", "wrong_output", "no_output_line", "endpoint_error",
                                 "request_refused", "skipped")
DETAIL_CHARS = 2000  # a rejected explanation's text kept for reading, cut here


class EndpointError(RuntimeError):
    """The endpoint cannot be used (unreachable, no such model, no key): the message says which
    field of ``data.traces.explain`` to look at."""
_OUTPUT_LINE = re.compile(r"^\W*output\W*:\s*(?P<value>.+?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ExplainSettings:
    """Where the explaining model is and how to ask it."""

    endpoint: str            # base URL of an OpenAI-compatible API, e.g. http://host:8000/v1
    model: str
    api_key_env: str | None = None   # the variable holding the key, read where requests are made
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

    @classmethod
    def from_spec(cls, spec: Any) -> ExplainSettings:
        """From the API's ``ExplainSpec`` (``data.traces.explain``, already validated)."""
        return cls(endpoint=spec.endpoint, model=spec.model, api_key_env=spec.api_key_env,
                   max_tokens=spec.max_tokens, temperature=spec.temperature,
                   concurrency=spec.concurrency, timeout=spec.timeout_seconds)

    def api_key(self) -> str:
        """The key from this process's environment ("EMPTY", which local servers accept, when no
        variable is named); a named variable that is unset is an error, not an empty key."""
        if self.api_key_env is None:
            return "EMPTY"
        key = os.environ.get(self.api_key_env)
        if not key:
            raise EndpointError(f"explain.apiKeyEnv: ${self.api_key_env} is not set in the "
                                "traces step's environment")
        return key

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.endpoint, api_key=self.api_key(),
                             timeout=self.timeout, max_retries=2)


def check_endpoint(settings: ExplainSettings) -> None:
    """Before any work: the endpoint answers (``GET /models``) and serves the model, else
    :class:`EndpointError` naming the field. Asked once per step process, so a wrong URL fails
    the step at once instead of after tracing, with every request counted as failed."""
    try:
        served = [m.id for m in settings.client().with_options(timeout=30).models.list()]
    except openai.OpenAIError as err:
        raise EndpointError(f"explain.endpoint {settings.endpoint}: no answer to GET /models "
                            f"({type(err).__name__}: {err})") from None
    if settings.model not in served:
        raise EndpointError(f"explain.model {settings.model!r} is not served at "
                            f"{settings.endpoint} (it serves {served})")


def sampled(record_id: str, fraction: float) -> bool:
    """Whether a trace is in the explained sample: a hash of its id below ``fraction``, so the
    choice is the same in every part and every run (pure)."""
    return fraction >= 1 or id_rank(record_id) < fraction


def id_rank(record_id: str) -> float:
    """A trace id's place in [0, 1), by hash: the sample and the cap's order (pure)."""
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:12], 16) / 16 ** 12


def part_share(max_records: int, index: int, count: int) -> int:
    """Part ``index`` of ``count``'s share of ``max_records``: the shares sum to it exactly
    (pure)."""
    return max_records // count + (1 if index < max_records % count else 0)


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


def rejected_record(record: dict[str, Any], kind: Verdict, explanation: str = "",
                    detail: str = "") -> dict[str, Any]:
    """What a trace that was not kept leaves (the data set's ``explain_rejected`` split): why,
    the value the explanation stated against the traced one, and the text, cut (pure)."""
    return {"id": record["id"], "verdict": kind, "return": record.get("return"),
            "stated": stated_output(explanation) if explanation else None,
            "explanation": explanation[:DETAIL_CHARS], "detail": detail[:DETAIL_CHARS]}


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
        self.client = self.settings.client()

    def _ask(self, record: dict[str, Any]) -> tuple[Verdict, dict[str, Any]]:
        if not explainable(record):
            return "skipped", rejected_record(record, "skipped")
        s = self.settings
        assert self.client is not None, "setup() runs before process()"
        try:
            reply = self.client.chat.completions.create(
                model=s.model, messages=prompt(record),  # type: ignore[arg-type]
                max_tokens=s.max_tokens, temperature=s.temperature)
        except openai.APIStatusError as err:
            kind: Verdict = "request_refused" if err.status_code < 500 else "endpoint_error"
            return kind, rejected_record(record, kind, detail=str(err))
        except openai.OpenAIError as err:
            return "endpoint_error", rejected_record(record, "endpoint_error", detail=str(err))
        text = explanation_text(reply.choices[0].message)
        kind = verdict(text, record)
        if kind != KEPT:
            return kind, rejected_record(record, kind, text)
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


class ExplainSample(beam.PTransform):
    """A split's trace records in, ``(verdict, record)`` pairs out: the ``fraction`` sample (by
    id hash), its traces that returned capped at ``cap`` (the lowest id hashes; None: no cap),
    asked through :class:`ExplainTraces`; the sample's other traces come out ``skipped``."""

    def __init__(self, settings: ExplainSettings, fraction: float, cap: int | None) -> None:
        super().__init__()
        self.settings, self.fraction, self.cap = settings, fraction, cap

    def expand(self, records):
        fraction = self.fraction
        sample = records | "Sample" >> beam.Filter(lambda r: sampled(r["id"], fraction))
        returned = sample | "Returned" >> beam.Filter(explainable)
        if self.cap == 0:   # more parts than maxRecords: this part asks for none
            returned = returned | "NoneOfThisPart" >> beam.Filter(lambda r: False)
        elif self.cap is not None:
            returned = (returned
                        | "Cap" >> beam.combiners.Top.Smallest(self.cap,
                                                               key=lambda r: id_rank(r["id"]))
                        | "Capped" >> beam.FlatMap(lambda chosen: chosen))
        skipped = (sample
                   | "NotReturned" >> beam.Filter(lambda r: not explainable(r))
                   | "Skipped" >> beam.Map(lambda r: ("skipped", rejected_record(r, "skipped"))))
        asked = returned | "Ask" >> ExplainTraces(self.settings)
        return (asked, skipped) | "AllVerdicts" >> beam.Flatten()


def kept(pairs: Iterable[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The explained records among verdict pairs (pure)."""
    return [record for kind, record in pairs if kind == KEPT]


def count_verdicts(pairs: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Every verdict's count, zeros included, for the manifest (pure)."""
    counts: dict[str, int] = dict.fromkeys(VERDICTS, 0)
    for kind, _ in pairs:
        counts[kind] += 1
    return counts
