r"""CWM's execution-trace format: the structured frames, their text, and which parts are tokens.

A trace is a prompt followed by frames (github.com/facebookresearch/cwm ``PROMPTING_GUIDE.md``,
"Trace Prediction"; ``demos/cwmdbg.py``, ``CWMDebugger._step``, which builds the same layout from
tokens)::

    <|begin_of_text|><|trace_context_start|>SOURCE<|frame_sep|>
    <|call_sep|>{"x": "3"}<|action_sep|>def f(x):\n<|frame_sep|>
    <|line_sep|>{"x": ".."}<|action_sep|>    return x + 1\n<|frame_sep|>
    <|return_sep|><|action_sep|>    return x + 1\n<|arg_sep|>"4"<|frame_sep|>
    <|end_of_text|>

(``\n`` is a newline). The rules and where each comes from:

* SOURCE marks the entry function's ``def`` line with ``  # << START_OF_TRACE``
  (PROMPTING_GUIDE; ``cwmdbg.py``'s ``_START_MARKER`` has the two leading spaces). The marker is
  in the context only: the call frame's action is the plain ``def`` line (``cwmdbg.py`` strips it
  from looked-up lines as "usually not predicted by the model"; its README shows the call frame
  as ``-> def f(c):``).
* An action is the source line with its trailing newline, as ``linecache`` gives it (the last
  line gets one too): ``cwmdbg.py`` strips a ``"\n"`` off predicted lines before looking them
  up. Inferred, not stated: CWM's tracer is not public.
* LOCALS is ``json.dumps`` of a dict from each local name to the value's ``repr`` (``cwmdbg.py``
  calls ``json.dumps(frame.local_vars)``: default separators, ``ensure_ascii=True``, so non-ASCII
  text is ``\uXXXX``-escaped); ``".."`` means unchanged since the previous frame of the same
  scope (``CWMDebugger.local_vars``). A line frame shows the state *before* its line runs.
* VALUE is ``json.dumps`` of the returned value's or the exception's ``repr`` (``cwmdbg.py``:
  ``json.dumps(frame.arg)``).
* A function left by an exception gets an exception frame and then a return frame (value
  ``None``), as ``sys.settrace`` reports it: ``cwmdbg.py`` ends a scope only at a return event
  (``next`` forces ``<|return_sep|>`` after any call, ``step_out`` waits for it).
* The special tokens come from structure only (``cwm/text/tokenizers.py`` encodes text with
  ``encode_ordinary``; ``cwmdbg.py`` appends the separator ids itself): :func:`trace_parts` says
  which pieces are tokens, so a value spelling ``<|frame_sep|>`` stays ordinary text.

Everything here is pure: no execution, no I/O.
"""

from __future__ import annotations

import ast
import json
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
FRAME_SEP = "<|frame_sep|>"
ACTION_SEP = "<|action_sep|>"
RETURN_SEP = "<|return_sep|>"
CALL_SEP = "<|call_sep|>"
LINE_SEP = "<|line_sep|>"
EXCEPTION_SEP = "<|exception_sep|>"
ARG_SEP = "<|arg_sep|>"
TRACE_CONTEXT_START = "<|trace_context_start|>"

#: Llama-3 reserved-slot ids CWM gave these tokens (for tokenizers that mirror CWM's vocabulary).
SPECIAL_TOKEN_IDS: dict[str, int] = {
    BEGIN_OF_TEXT: 128000, END_OF_TEXT: 128001,
    FRAME_SEP: 128100, ACTION_SEP: 128101, RETURN_SEP: 128102, CALL_SEP: 128103,
    LINE_SEP: 128104, EXCEPTION_SEP: 128105, ARG_SEP: 128106, TRACE_CONTEXT_START: 128107,
}
TRACE_TOKENS = tuple(SPECIAL_TOKEN_IDS)

START_MARKER = "# << START_OF_TRACE"
UNCHANGED = ".."
EVENTS = ("call", "line", "return", "exception")
EVENT_TOKEN = {"call": CALL_SEP, "line": LINE_SEP, "return": RETURN_SEP,
               "exception": EXCEPTION_SEP}
TOKEN_EVENT = {token: event for event, token in EVENT_TOKEN.items()}


class TraceFormatError(ValueError):
    """Text that is not a well-formed trace; the message says where it breaks."""


class Frame(NamedTuple):
    """One step of a trace (a named tuple: the tracer makes tens of thousands per second).

    ``locals`` (call and line frames) maps names to ``repr`` strings or ``".."``; ``line`` is the
    action text (the source line with its newline, see :func:`action_line`); ``value`` (return
    and exception frames) is the ``repr`` of the returned value or the exception."""

    event: str
    locals: dict[str, str] | None
    line: str
    value: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, "locals": self.locals, "line": self.line,
                "value": self.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Frame:
        return cls(data["event"], data.get("locals"), data["line"], data.get("value"))


def mark_entry(source: str, entry: str) -> str:
    """Append ``# << START_OF_TRACE`` to the ``def`` line of the top-level function ``entry``."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise TraceFormatError(f"source does not parse: {err}") from None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry:
            lines = source.split("\n")
            lines[node.lineno - 1] = f"{lines[node.lineno - 1].rstrip()}  {START_MARKER}"
            return "\n".join(lines)
    raise TraceFormatError(f"entry function {entry!r} is not defined at the top level")


def trace_prompt(source_with_marker: str) -> str:
    """The prompt a model continues with frames."""
    return f"{BEGIN_OF_TEXT}{TRACE_CONTEXT_START}{source_with_marker}{FRAME_SEP}"


def encode_locals(values: dict[str, str]) -> str:
    """``json.dumps(values)`` (``", "``/``": "`` separators, ``ensure_ascii=True``), written with
    the C string encoder because the tracer's reference calls it per frame."""
    return "{" + ", ".join(f"{encode_basestring_ascii(k)}: {encode_basestring_ascii(v)}"
                           for k, v in values.items()) + "}"


def encode_value(value: str) -> str:
    """A return or exception VALUE: ``json.dumps(repr_text)``."""
    return encode_basestring_ascii(value)


def action_line(line: str) -> str:
    """A source line as a frame's action: without the entry marker, with one trailing newline."""
    return unmark(line.rstrip("\n")) + "\n"


def unmark(line: str) -> str:
    """``line`` without a trailing ``  # << START_OF_TRACE``."""
    return line.removesuffix(f"  {START_MARKER}")


def encode_frame(frame: Frame) -> str:
    token = EVENT_TOKEN[frame.event]
    if frame.event in ("call", "line"):
        return f"{token}{encode_locals(frame.locals or {})}{ACTION_SEP}{frame.line}{FRAME_SEP}"
    return f"{token}{ACTION_SEP}{frame.line}{ARG_SEP}{encode_value(frame.value or '')}{FRAME_SEP}"


def encode_frames(frames: list[Frame]) -> str:
    return "".join(encode_frame(f) for f in frames)


def encode_trace(source: str, frames: list[Frame], *, complete: bool = True) -> str:
    """Prompt + frames (+ ``<|end_of_text|>`` when execution left the entry scope).

    ``source`` is the program with its entry already marked (see :func:`mark_entry`)."""
    return trace_prompt(source) + encode_frames(frames) + (END_OF_TEXT if complete else "")


def frame_parts(frame: Frame) -> list[tuple[str, bool]]:
    """A frame as ``(text, is_special_token)`` pieces: separators are tokens, the rest text."""
    if frame.event in ("call", "line"):
        return [(EVENT_TOKEN[frame.event], True), (encode_locals(frame.locals or {}), False),
                (ACTION_SEP, True), (frame.line, False), (FRAME_SEP, True)]
    return [(EVENT_TOKEN[frame.event], True), (ACTION_SEP, True), (frame.line, False),
            (ARG_SEP, True), (encode_value(frame.value or ""), False), (FRAME_SEP, True)]


def trace_parts(context: str, frames: list[Frame], *, complete: bool = True
                ) -> list[tuple[str, bool]]:
    """The trace of :func:`encode_trace` as ``(text, is_special_token)`` pieces, for a tokenizer
    to encode the text pieces as ordinary text and the token pieces as their ids
    (``cwm_model.tokenizer.CWMTokenizer.encode_parts``), as CWM's ``cwmdbg.py`` does."""
    parts = [(BEGIN_OF_TEXT, True), (TRACE_CONTEXT_START, True), (context, False),
             (FRAME_SEP, True)]
    for frame in frames:
        parts += frame_parts(frame)
    if complete:
        parts.append((END_OF_TEXT, True))
    return [(text, special) for text, special in parts if special or text]


def split_trace(text: str, frames: list[Frame]) -> tuple[str, bool]:
    """``(context, complete)`` of a trace record from its text and its structured frames.

    The text alone is ambiguous when a value or the source spells a special token; the frames
    say where the frames' text starts, so the context is exactly what precedes it. Raises
    :class:`TraceFormatError` when ``text`` is not ``encode_trace(context, frames, complete)``."""
    head = BEGIN_OF_TEXT + TRACE_CONTEXT_START
    complete = text.endswith(END_OF_TEXT)
    body = text[: -len(END_OF_TEXT)] if complete else text
    tail = FRAME_SEP + encode_frames(frames)
    if not text.startswith(head) or not body.endswith(tail) or len(body) < len(head) + len(tail):
        raise TraceFormatError("trace text does not match its frames (expected the prompt, "
                               "then the frames' text, then optionally <|end_of_text|>)")
    return body[len(head): len(body) - len(tail)], complete


def parse_trace(text: str) -> tuple[str, list[Frame]]:
    """Inverse of :func:`encode_trace`: the marked source and the frames."""
    head = BEGIN_OF_TEXT + TRACE_CONTEXT_START
    if not text.startswith(head):
        raise TraceFormatError(f"trace must start with {head}")
    body = text[len(head):]
    if body.endswith(END_OF_TEXT):
        body = body[: -len(END_OF_TEXT)]
    pieces = body.split(FRAME_SEP)
    if len(pieces) < 2 or pieces[-1] != "":
        raise TraceFormatError("trace must end with <|frame_sep|> (before <|end_of_text|>)")
    source = pieces[0]
    frames = [parse_frame(piece, index) for index, piece in enumerate(pieces[1:-1])]
    return source, frames


def _json(text: str, error: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TraceFormatError(f"{error} ({err})") from None


def parse_frame(piece: str, index: int = 0) -> Frame:
    """One frame's text without its trailing ``<|frame_sep|>``."""
    token = next((t for t in TOKEN_EVENT if piece.startswith(t)), None)
    if token is None:
        raise TraceFormatError(f"frame {index}: does not start with an event token: {piece[:40]!r}")
    event = TOKEN_EVENT[token]
    rest = piece[len(token):]
    if event in ("call", "line"):
        locals_text, sep, line = rest.partition(ACTION_SEP)
        if not sep:
            raise TraceFormatError(f"frame {index}: {event} frame without <|action_sep|>")
        values = _json(locals_text, f"frame {index}: locals are not JSON")
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise TraceFormatError(f"frame {index}: locals must map names to strings")
        return Frame(event, values, line)
    if not rest.startswith(ACTION_SEP):
        raise TraceFormatError(f"frame {index}: {event} frame must start with <|action_sep|>")
    line, sep, value_text = rest[len(ACTION_SEP):].rpartition(ARG_SEP)
    if not sep:
        raise TraceFormatError(f"frame {index}: {event} frame without <|arg_sep|>")
    value = _json(value_text, f"frame {index}: value is not a JSON string")
    if not isinstance(value, str):
        raise TraceFormatError(f"frame {index}: value must be a JSON string")
    return Frame(event, None, line, value)


def final_value(frames: list[Frame]) -> tuple[str, str] | None:
    """``(event, value)`` of how the entry scope was left, if the trace got that far: its return,
    or the exception of an exception frame directly followed by the (``None``) return frame that
    ``sys.settrace`` reports when an exception leaves a function."""
    if not frames or frames[-1].event not in ("return", "exception"):
        return None
    if frames[-1].event == "return" and len(frames) > 1 and frames[-2].event == "exception":
        return "exception", frames[-2].value or ""
    return frames[-1].event, frames[-1].value or ""


def mark_line(source: str, lineno: int) -> str:
    """Append ``# << START_OF_TRACE`` to line ``lineno`` (1-based): the ``def`` line of an entry
    found at run time (a method or nested function, which :func:`mark_entry` cannot name)."""
    lines = source.split("\n")
    if not 1 <= lineno <= len(lines):
        raise TraceFormatError(f"line {lineno} is outside the source ({len(lines)} lines)")
    lines[lineno - 1] = f"{lines[lineno - 1].rstrip()}  {START_MARKER}"
    return "\n".join(lines)
