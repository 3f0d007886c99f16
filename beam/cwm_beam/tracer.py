"""Record a function's execution as CWM frames, in this process (``sys.settrace``).

Untrusted code must only reach :func:`trace_function` inside the sandbox (``TracePool`` runs it in
a forked child of a bubblewrapped fork server); this module itself isolates nothing.

What is recorded: the entry function's call, line, return and exception events, and those of the
functions it calls that are defined in the traced source, up to ``TraceLimits.max_depth`` levels
below the entry, each stepped into with probability ``step_in_probability`` (CWM's repository
episodes step into callees at random). Comprehensions and generator expressions are not scopes of
their own (as in Python 3.12, PEP 709): their work shows in the enclosing line's next state.

Why it is fast (the benchmark, ``benchmarks/tracer.py``, compares with pysnooper): frames of other
code are refused at the ``call`` event so library code runs untraced; a local whose object is the
same immutable object as at the previous frame is known unchanged without calling ``repr``; each
frame is encoded to text once, when recorded, which is also how the byte limit is enforced.
"""

from __future__ import annotations

import random
from itertools import islice
import sys
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from types import FrameType
from typing import Any

from cwm_beam.trace_format import (
    ACTION_SEP, ARG_SEP, CALL_SEP, END_OF_TEXT, EXCEPTION_SEP, FRAME_SEP, LINE_SEP, RETURN_SEP,
    Frame, TraceFormatError, mark_entry, trace_prompt,
)

FILENAME = "<cwm-traced>"
TRUNCATION_MARKER = "...<truncated>"
_SKIPPED_SCOPES = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>"})
_SLICEABLE = frozenset({list, tuple, str, bytes})
_ATOMS = frozenset({int, bool, type(None), float})
_IMMUTABLE = frozenset({int, float, str, bool, type(None), bytes, complex, range})
_UNCHANGED_JSON = encode_basestring("..")


@dataclass(frozen=True)
class TraceLimits:
    """What a trace may cost; exceeding events or bytes stops the program and records why."""

    max_events: int = 10_000
    max_bytes: int = 1_000_000
    max_repr_chars: int = 200
    max_depth: int = 4            # callee levels below the entry that may be stepped into
    step_in_probability: float = 1.0
    trace_lambdas: bool = False   # lambdas (sort keys, ...) are short: their value shows anyway
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_events", "max_bytes", "max_repr_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TraceLimits.{name} must be positive")
        if self.max_depth < 0:
            raise ValueError("TraceLimits.max_depth must be >= 0")
        if not 0.0 <= self.step_in_probability <= 1.0:
            raise ValueError("TraceLimits.step_in_probability must be within [0, 1]")

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TraceResult:
    """Outcome of one traced call. ``text`` is the full CWM trace (``<|end_of_text|>`` only when
    execution left the entry scope); ``return_repr``/``exception`` are the entry's outcome, written
    in full (not capped); ``truncated_reason`` names the limit that stopped the trace."""

    frames: list[Frame]
    text: str
    return_repr: str | None
    exception: str | None
    truncated_reason: str | None
    events: int
    exception_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"frames": [f.to_json() for f in self.frames], "text": self.text,
                "return_repr": self.return_repr, "exception": self.exception,
                "truncated_reason": self.truncated_reason, "events": self.events,
                "exception_type": self.exception_type}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TraceResult":
        return cls([Frame.from_json(f) for f in data["frames"]], data["text"],
                   data["return_repr"], data["exception"], data["truncated_reason"],
                   data["events"], data.get("exception_type"))


_ACTIVE: list["_Recorder | None"] = [None]


def active_recorder() -> "_Recorder | None":
    """The recorder of the trace in progress (the sandbox's audit hook asks it)."""
    return _ACTIVE[0]


class TraceLimitExceeded(BaseException):
    """Raised into the traced code to stop it (BaseException so ``except Exception`` in the
    traced program does not swallow it)."""


class ProgramError(ValueError):
    """The program or its input cannot be set up for tracing (syntax, missing entry, bad input)."""


def capped_repr(obj: Any, cap: int) -> str:
    """``repr`` cut to ``cap`` characters plus a visible marker.

    A long list, tuple, dict, str or bytes is not repr'd whole: the repr of a prefix long enough
    to fill ``cap`` characters has the same first ``cap`` characters, at a fraction of the cost
    (the repr of a 300-int list takes 25 µs, and a loop over it repeats that at every line)."""
    kind = type(obj)
    try:
        if kind in _SLICEABLE and len(obj) > cap // 3 + 2:
            text = repr(obj[: cap // 3 + 2] if kind is not str else obj[:cap + 1])
        elif kind is dict and len(obj) > cap // 3 + 2:
            text = repr(dict(islice(obj.items(), cap // 3 + 2)))
        else:
            text = repr(obj)
    except BaseException as err:  # a hostile or broken __repr__ must not kill the tracer
        if isinstance(err, TraceLimitExceeded):
            raise
        return f"<repr failed: {type(err).__name__}>"
    if len(text) > cap:
        return text[:cap] + TRUNCATION_MARKER
    return text


class _Scope:
    """Per-frame state: the last value seen for each local (object and its repr)."""

    __slots__ = ("frame", "previous", "fresh", "last_event")

    def __init__(self, frame: FrameType) -> None:
        self.frame = frame
        self.previous: dict[str, tuple[Any, str]] = {}
        self.fresh = True        # write every value in full at the next frame
        self.last_event = "call"


class _Recorder:
    """The settrace callbacks and the frames they produce (hot path: keep it flat)."""

    def __init__(self, lines: list[str], entry_code, limits: TraceLimits) -> None:
        self.lines = [""] + lines          # indexed by line number
        self.entry_code = entry_code
        self.limits = limits
        self.cap = limits.max_repr_chars
        self.rng = random.Random(limits.seed) if limits.step_in_probability < 1.0 else None
        self.stack: list[_Scope] = []
        self.frames: list[tuple] = []
        self.pieces: list[str] = []
        self.size = 0
        self.truncated: str | None = None
        self.done = False
        self.keys: dict[str, str] = {}     # name -> '"name": ' (JSON-encoded once)
        self.max_events, self.max_bytes = limits.max_events, limits.max_bytes

    # ---- settrace callbacks --------------------------------------------------------------
    def on_call(self, frame: FrameType, event: str, arg: Any):
        if event != "call" or self.done or self.truncated:
            return None
        code = frame.f_code
        if code.co_filename != FILENAME:
            return None
        if not self.stack:
            if code is not self.entry_code:
                return None
        else:
            if frame.f_back is not self.stack[-1].frame or len(self.stack) > self.limits.max_depth:
                return None
            name = code.co_name
            if name in _SKIPPED_SCOPES and (name != "<lambda>" or not self.limits.trace_lambdas):
                return None
            if self.rng is not None and self.rng.random() >= self.limits.step_in_probability:
                return None
        scope = _Scope(frame)
        self.stack.append(scope)
        self._state_frame("call", CALL_SEP, scope, frame)
        return self.on_local

    def on_local(self, frame: FrameType, event: str, arg: Any):
        if self.truncated:
            raise TraceLimitExceeded(self.truncated)
        scope = self.stack[-1]
        if event == "line":
            self._state_frame("line", LINE_SEP, scope, frame)
        elif event == "return":
            # After an exception propagates, Python still reports "return None": skip it, the
            # exception frame already says how the scope ended.
            if scope.last_event != "exception" or arg is not None:
                value = repr(arg) if len(self.stack) == 1 else capped_repr(arg, self.cap)
                self._value_frame("return", RETURN_SEP, frame, value)
            self.stack.pop()
            if self.stack:
                self.stack[-1].fresh = True
            else:
                self.done = True
        elif event == "exception":
            exc = arg[1]
            if isinstance(exc, TraceLimitExceeded):
                return self.on_local
            value = _exception_repr(exc, None if len(self.stack) == 1 else self.cap)
            self._value_frame("exception", EXCEPTION_SEP, frame, value)
        scope.last_event = event
        return self.on_local

    # ---- frame construction --------------------------------------------------------------
    def _state_frame(self, event: str, token: str, scope: _Scope, frame: FrameType) -> None:
        previous, fresh, cap, keys = scope.previous, scope.fresh, self.cap, self.keys
        values: dict[str, str] = {}
        parts: list[str] = []
        size = 0
        for name, obj in frame.f_locals.items():
            key = keys.get(name)
            if key is None:
                key = keys[name] = encode_basestring(name) + ": "
            seen = previous.get(name)
            if seen is not None and not fresh and seen[0] is obj and type(obj) in _IMMUTABLE:
                values[name] = ".."
                parts.append(key + _UNCHANGED_JSON)
                continue
            kind = type(obj)
            if kind in _ATOMS or (kind is str and len(obj) < cap // 2):
                text = repr(obj)           # fast path: no call, no exception possible
                if len(text) > cap:
                    text = capped_repr(obj, cap)
            else:
                text = capped_repr(obj, cap)
            previous[name] = (obj, text)
            if seen is not None and not fresh and seen[1] == text:
                values[name] = ".."
                parts.append(key + _UNCHANGED_JSON)
            else:
                values[name] = text
                encoded = encode_basestring(text)
                size += len(encoded)
                parts.append(key + encoded)
        if len(previous) > len(values):   # names deleted since the last frame
            for name in [n for n in previous if n not in values]:
                del previous[name]
        scope.fresh = False
        line = self.lines[frame.f_lineno]
        self.frames.append((event, values, line, None))
        piece = f"{token}{{{', '.join(parts)}}}{ACTION_SEP}{line}{FRAME_SEP}"
        self.pieces.append(piece)
        self.size += len(piece)
        if len(self.frames) > self.max_events or self.size > self.max_bytes:
            self._stop()

    def _value_frame(self, event: str, token: str, frame: FrameType, value: str) -> None:
        line = self.lines[frame.f_lineno]
        self.frames.append((event, None, line, value))
        piece = f"{token}{ACTION_SEP}{line}{ARG_SEP}{encode_basestring(value)}{FRAME_SEP}"
        self.pieces.append(piece)
        self.size += len(piece)
        if len(self.frames) > self.max_events or self.size > self.max_bytes:
            self._stop()

    def _stop(self) -> None:
        reason = (f"max_events ({self.limits.max_events})"
                  if len(self.frames) > self.limits.max_events
                  else f"max_bytes ({self.limits.max_bytes})")
        self.frames.pop()
        self.pieces.pop()
        self.truncated = reason
        raise TraceLimitExceeded(reason)


def _exception_repr(exc: BaseException, cap: int | None) -> str:
    try:
        text = repr(exc)
    except BaseException:
        text = f"{type(exc).__name__}(<repr failed>)"
    if cap is not None and len(text) > cap:
        text = text[:cap] + TRUNCATION_MARKER
    return text


def parse_call_args(args_src: str, namespace: dict[str, Any]) -> tuple[tuple, dict]:
    """Evaluate CRUXEval-style input text (``"'abc', 3"``, ``"dict(a=1), x=2"``) as call
    arguments, in the program's namespace."""
    namespace = dict(namespace)
    namespace["__cwm_args__"] = lambda *a, **k: (a, k)
    try:
        code = compile(f"__cwm_args__({args_src})", "<input>", "eval")
    except SyntaxError as err:
        raise ProgramError(f"input does not parse as call arguments: {err.msg}") from None
    return eval(code, namespace)


def trace_function(source: str, entry: str, args_src: str, *,
                   limits: TraceLimits = TraceLimits()) -> TraceResult:
    """Execute ``source``, call ``entry(<args_src>)`` under the tracer and return the trace.

    Raises :class:`ProgramError` when the program cannot even be set up (syntax error, no such
    function, input that does not evaluate); anything the call itself raises is part of the
    trace."""
    try:
        marked = mark_entry(source, entry)
        code = compile(source, FILENAME, "exec")
    except (TraceFormatError, SyntaxError, ValueError) as err:
        raise ProgramError(str(err)) from None
    namespace: dict[str, Any] = {"__name__": "__cwm__", "__builtins__": __builtins__}
    try:
        exec(code, namespace)
        args, kwargs = parse_call_args(args_src, namespace)
    except ProgramError:
        raise
    except Exception as err:
        raise ProgramError(f"setting up the program failed: {_exception_repr(err, 500)}") from None
    function = namespace.get(entry)
    if not callable(function) or not hasattr(function, "__code__"):
        raise ProgramError(f"entry {entry!r} is not a Python function")
    return trace_call(function, args, kwargs, marked, limits)


def trace_call(function, args: tuple, kwargs: dict, marked_source: str,
               limits: TraceLimits = TraceLimits()) -> TraceResult:
    """Call ``function`` (compiled from ``marked_source`` under :data:`FILENAME`) under the
    tracer. Split from :func:`trace_function` so the benchmark can time the traced call alone."""
    marked = marked_source
    # Line texts come from the marked source: the entry's call frame shows the marker, as the
    # prompt does (the marker is a comment, so line numbers are unchanged).
    recorder = _Recorder(marked.split("\n"), function.__code__, limits)
    head = trace_prompt(marked)
    recorder.size = len(head)
    return_repr = exception = exception_type = None
    _ACTIVE[0] = recorder
    sys.settrace(recorder.on_call)
    try:
        value = function(*args, **kwargs)
    except TraceLimitExceeded:
        pass
    except BaseException as err:  # the traced program's exception is data, not our failure
        exception, exception_type = _exception_repr(err, None), type(err).__name__
    else:
        return_repr = repr(value) if not recorder.truncated else None
    finally:
        sys.settrace(None)
        _ACTIVE[0] = None
    frames = [Frame(*f) for f in recorder.frames]
    if not recorder.done and recorder.truncated is None:
        # The trace function was switched off under us: the program called sys.settrace, or the
        # stack overflowed inside the trace function itself.
        recorder.truncated = "tracing stopped before the entry returned" + (
            f" ({exception_type})" if exception_type else "")
        return_repr = None
    complete = recorder.done and recorder.truncated is None
    text = head + "".join(recorder.pieces) + (END_OF_TEXT if complete else "")
    return TraceResult(frames, text, return_repr, exception, recorder.truncated, len(frames),
                       exception_type)
