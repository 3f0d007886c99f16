"""Record a function's execution as CWM frames, in this process (``sys.settrace``).

Untrusted code must only reach :func:`trace_function` inside the sandbox (``TracePool`` runs it in
a forked child of a bubblewrapped fork server); this module itself isolates nothing.

What is recorded: the entry function's call, line, return and exception events, and those of the
functions it calls that are defined in the traced source, up to ``TraceLimits.max_depth`` levels
below the entry, each stepped into with probability ``step_in_probability`` (CWM's repository
episodes step into callees at random). Comprehensions and generator expressions are not scopes of
their own (as in Python 3.12, PEP 709): their work shows in the enclosing line's next state.

Two recorders give the same frames and text (``tests/traces/test_ctracer.py`` checks it on every
CRUXEval program): :class:`_FunctionRecorder` here, the reference, and ``cwm_exec._ctracer``, the
same rules in C installed with ``_PyEval_SetTrace`` (no Python call and no locals round trip per
event), used by :func:`trace_call` wherever it was built (``CWM_TRACER=python`` picks the
reference). Repository episodes (:class:`EpisodeTracer`) use the Python recorder.

Where the time goes (``benchmarks/tracer.py`` compares with a naive tracer and pysnooper): frames
of other code are refused at the ``call`` event (a per-code-object decision, cached by id) so
library code runs untraced; a local that is the same immutable object as at the previous frame, or
the same list/tuple/dict still holding the very same immutable items in the part its capped repr
shows, is known unchanged without calling ``repr``; each frame's JSON is assembled from cached
per-name key strings; each frame is encoded once, when recorded, which is also how the byte limit
is enforced; no cyclic garbage collection runs while tracing.
"""

from __future__ import annotations

import gc
import os
import random
import re
import sys
from dataclasses import dataclass
from itertools import islice

# JSON strings as json.dumps writes them by default (ensure_ascii=True), as CWM's traces have them.
from json.encoder import encode_basestring_ascii as encode_basestring
from operator import is_
from types import FrameType
from typing import Any

from cwm_exec.trace_format import (
    ACTION_SEP,
    ARG_SEP,
    CALL_SEP,
    END_OF_TEXT,
    EXCEPTION_SEP,
    FRAME_SEP,
    LINE_SEP,
    RETURN_SEP,
    START_MARKER,
    UNCHANGED,
    Frame,
    TraceFormatError,
    action_line,
    encode_frames,
    final_value,
    mark_entry,
    mark_line,
    trace_prompt,
)

FILENAME = "<cwm-traced>"
TRUNCATION_MARKER = "...<truncated>"
_SKIPPED_SCOPES = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>"})
_SLICEABLE = frozenset({list, tuple, str, bytes})
_ATOMS = frozenset({int, bool, type(None), float})
_IMMUTABLE = frozenset({int, float, str, bool, type(None), bytes, complex, range})
_MISSING = object()
_new_frame = tuple.__new__   # Frame(...) without the named tuple's Python-level __new__


class _KeyCache(dict):
    """name -> its JSON text in a locals object: ``'"x": '`` (or ``'"x": ".."'``), made once."""

    def __init__(self, suffix: str) -> None:
        super().__init__()
        self.suffix = suffix

    def __missing__(self, name: str) -> str:
        text = self[name] = f"{encode_basestring(name)}: {self.suffix}"
        return text


_JSON_KEYS = _KeyCache("")
_UNCHANGED_ITEMS = _KeyCache(encode_basestring(UNCHANGED))
_CONTAINERS = frozenset({list, tuple, dict})
_ATOM_TYPES = frozenset({int, float, str, bool, type(None), bytes, complex})
_MIN_SNAPSHOT = 8   # containers shorter than this are repr'd every time (cheaper than comparing)



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
    def from_json(cls, data: dict[str, Any]) -> TraceResult:
        return cls([Frame.from_json(f) for f in data["frames"]], data["text"],
                   data["return_repr"], data["exception"], data["truncated_reason"],
                   data["events"], data.get("exception_type"))


_ACTIVE: list[_Recorder | None] = [None]


def active_recorder() -> _Recorder | None:
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


def _span(cap: int) -> int:
    """How many leading items of a container its capped repr can show, plus one: equal
    snapshots of this many items mean equal capped reprs (see :func:`capped_repr`)."""
    return cap // 3 + 3


def _snapshot(obj: Any, kind: type, span: int) -> Any:
    """The first ``span`` items of a list, tuple or dict, kept when they are all immutable atoms
    (then the same items, by identity, have the same repr); ``None`` when not worth it (a short
    container reprs faster than it compares) or not possible (a mutable item may change inside)."""
    if len(obj) < _MIN_SNAPSHOT:
        return None
    if kind is dict:
        keys, values = list(islice(obj, span)), list(islice(obj.values(), span))
        if _ATOM_TYPES.issuperset(map(type, keys)) and _ATOM_TYPES.issuperset(map(type, values)):
            return keys, values
        return None
    prefix = obj[:span]
    return prefix if _ATOM_TYPES.issuperset(map(type, prefix)) else None


def _unchanged(obj: Any, kind: type, snap: Any, span: int) -> bool:
    """The same container object still starts with the very same (immutable) items."""
    if kind is dict:
        keys, values = snap
        current = list(islice(obj, span))
        return (len(current) == len(keys) and all(map(is_, current, keys))
                and all(map(is_, islice(obj.values(), span), values)))
    current = obj[:span]
    return len(current) == len(snap) and all(map(is_, current, snap))


class _Scope:
    """Per-frame state: the last object, repr and container snapshot seen for each local."""

    __slots__ = ("frame", "objects", "texts", "snaps", "lines", "fresh", "raised", "local",
                 "slow_local", "encode")

    def __init__(self, frame: FrameType, lines: list[str]) -> None:
        self.frame = frame
        self.objects: dict[str, Any] = {}
        self.texts: dict[str, str] = {}
        self.snaps: dict[str, Any] = {}   # name -> prefix snapshot of a container (_snapshot)
        self.lines = lines       # line texts of this frame's file, indexed by line number
        self.fresh = False       # write every value in full at the next state frame
        self.raised = False      # the last event was an exception
        self.local: Any = None
        self.slow_local: Any = None
        self.encode: Any = None  # the line encoder (_Recorder._line_encoder)

    def forget_deleted(self, current: dict[str, str]) -> None:
        """Drop what was kept for names the frame no longer has (``del``)."""
        for name in [n for n in self.objects if n not in current]:
            del self.objects[name], self.texts[name]
            self.snaps.pop(name, None)


class _Recorder:
    """The settrace callbacks and the frames they produce.

    Each traced frame gets a fast local trace function (a closure made by :meth:`_tracers`) for
    the common case, and, only when first needed, a slow one installed as ``frame.f_trace`` while
    the scope must write its values in full (after a callee returned) or just saw an exception. The
    fast one finds unchanged values by identity (and containers of immutable items by their
    items' identity) before calling ``repr``, and encodes each frame's locals with the C JSON
    encoder in one call. ``stop_program`` says what a limit does: raise into the traced program
    (a function trace; CPython then switches tracing off), or only stop recording (an episode
    cut from a test suite, which must go on).
    """

    def __init__(self, entry_code, limits: TraceLimits, *, stop_program: bool = True) -> None:
        self.entry_code = entry_code
        self.limits = limits
        self.cap = limits.max_repr_chars
        self.rng = random.Random(limits.seed) if limits.step_in_probability < 1.0 else None
        self.scopes: list[_Scope] = []
        self.frames: list[Frame] = []
        self.pieces: list[str] = []
        self.size = 0
        self.truncated: str | None = None
        self.done = False
        self.stopped = False      # done, truncated or abandoned: record nothing more
        self.stop_program = stop_program
        self.max_events, self.max_bytes = limits.max_events, limits.max_bytes
        self.codes: dict[int, tuple] = {}   # id(code) -> (code, (lines, call line) or None)

    # ---- which code is traced ------------------------------------------------------------
    def code_info(self, code) -> tuple | None:
        """``(line texts, call-frame line)`` for a code object to trace, ``None`` to refuse it
        (subclasses say which files are traced)."""
        return None

    @staticmethod
    def call_line(lines: list[str], code) -> str:
        """The ``def`` line (a decorated function's first line is its first decorator)."""
        number = def_line_number(lines, code)
        return lines[number] if number < len(lines) else ""

    def skipped(self, code) -> bool:
        name = code.co_name
        return name in _SKIPPED_SCOPES and (name != "<lambda>" or not self.limits.trace_lambdas)

    # ---- settrace callbacks --------------------------------------------------------------
    def on_call(self, frame: FrameType, event: str, arg: Any):
        """Global trace function: decides at each new frame whether to step into it."""
        if self.stopped:
            return self._refuse(frame)
        code = frame.f_code
        # Keyed by id: hashing a code object hashes its constants and names on every look-up.
        # The value keeps the code object alive, so its id is not reused while cached.
        known = self.codes.get(id(code))
        if known is None or known[0] is not code:
            known = self.codes[id(code)] = (code, self.code_info(code))
        info = known[1]
        if info is None:
            return None
        scopes = self.scopes
        if not scopes:
            if code is not self.entry_code:
                return self._refuse(frame)
        elif (frame.f_back is not scopes[-1].frame or len(scopes) > self.limits.max_depth
              or (self.rng is not None
                  and self.rng.random() >= self.limits.step_in_probability)):
            return self._refuse(frame)
        scope = _Scope(frame, info[0])
        scopes.append(scope)
        scope.local = self._tracers(scope)
        if self._full_frame(CALL_SEP, "call", scope, frame.f_locals, info[1]):
            return self._stopped_tracer(scope)
        return scope.local

    @staticmethod
    def _refuse(frame: FrameType) -> None:
        """Leave a frame untraced. A resumed generator that was a scope before still holds
        that scope's tracer (returning None at a call event keeps ``f_trace``): drop it."""
        if frame.f_trace is not None:
            frame.f_trace = None

    def _tracers(self, scope: _Scope):
        """The scope's fast tracer: each line event becomes a line frame of what changed."""
        recorder, frames, pieces, lines = self, self.frames, self.pieces, scope.lines
        max_events, max_bytes = self.max_events, self.max_bytes
        encode = scope.encode = self._line_encoder(scope)

        def local(frame: FrameType, event: str, arg: Any):
            if event != "line":
                return recorder._scope_event(scope, frame, event, arg)
            values, parts = encode(frame.f_locals)
            line = lines[frame.f_lineno]
            frames.append(_new_frame(Frame, ("line", values, line, None)))
            piece = f"{LINE_SEP}{{{', '.join(parts)}}}{ACTION_SEP}{line}{FRAME_SEP}"
            pieces.append(piece)
            recorder.size += len(piece)
            if len(frames) > max_events or recorder.size > max_bytes:
                recorder._stop()
                return recorder._stopped_tracer(scope)
            return local

        return local

    def _line_encoder(self, scope: _Scope):
        """``encode(f_locals) -> (values, JSON parts)`` for a line frame of ``scope``.

        A name stays ``UNCHANGED`` while it holds the same object and that object did not
        change (immutable ones cannot; containers are compared with their snapshot) or its new
        value has the same text. What it reads is bound once here: fewer look-ups per local."""
        cap, objects, texts, snaps = self.cap, scope.objects, scope.texts, scope.snaps
        span, short = _span(cap), cap // 2
        previous, previous_text = objects.get, texts.get

        def encode(f_locals: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
            values: dict[str, str] = {}
            parts: list[str] = []
            for name, obj in f_locals.items():
                kind = type(obj)
                if obj is previous(name, _MISSING):
                    if kind in _IMMUTABLE:
                        text = None
                    else:
                        snap = snaps.get(name)
                        if snap is not None and _unchanged(obj, kind, snap, span):
                            text = None
                        else:
                            text = capped_repr(obj, cap)
                            if kind in _CONTAINERS:
                                snaps[name] = _snapshot(obj, kind, span)
                            if text == texts[name]:
                                text = None
                else:
                    if kind in _ATOMS or (kind is str and len(obj) < short):
                        try:
                            text = repr(obj)
                        except ValueError:   # an int too long to convert
                            text = capped_repr(obj, cap)
                        if len(text) > cap:
                            text = capped_repr(obj, cap)
                    else:
                        text = capped_repr(obj, cap)
                    # A snapshot belongs to the object it was taken of (a stale one would be
                    # compared with whatever the name holds next).
                    if kind in _CONTAINERS:
                        snaps[name] = _snapshot(obj, kind, span)
                    elif snaps:
                        snaps.pop(name, None)
                    objects[name] = obj
                    if text == previous_text(name):
                        text = None
                if text is None:
                    values[name] = UNCHANGED
                    parts.append(_UNCHANGED_ITEMS[name])
                else:
                    texts[name] = text
                    values[name] = text
                    parts.append(_JSON_KEYS[name] + encode_basestring(text))
            if len(objects) > len(values):
                scope.forget_deleted(values)
            return values, parts

        return encode

    def _slow(self, scope: _Scope):
        """The scope's slow tracer (made on first need: most scopes never call out or raise)."""
        if scope.slow_local is None:
            scope.slow_local = self._make_slow(scope)
        return scope.slow_local

    def _make_slow(self, scope: _Scope):
        recorder, local, lines = self, scope.local, scope.lines

        def slow_local(frame: FrameType, event: str, arg: Any):
            if event != "line":
                return recorder._scope_event(scope, frame, event, arg)
            scope.raised = False
            if scope.fresh:
                scope.fresh = False
                if recorder._full_frame(LINE_SEP, "line", scope, frame.f_locals,
                                        lines[frame.f_lineno]):
                    return recorder._stopped_tracer(scope)
                return local
            return local(frame, event, arg)

        return slow_local

    def _scope_event(self, scope: _Scope, frame: FrameType, event: str, arg: Any):
        """A return or exception event of a traced frame (rarer than lines: kept out of the
        fast tracer)."""
        lines, cap = scope.lines, self.cap
        if event == "return":
            # After an exception propagates, Python still reports "return None": recorded, as
            # CWM's debugger expects every scope to end with a return frame (trace_format).
            value = repr(arg) if len(self.scopes) == 1 else capped_repr(arg, cap)
            if self._value_frame(RETURN_SEP, "return", lines[frame.f_lineno], value):
                return self._stopped_tracer(scope)
            self._leave()
            return None
        if event == "exception":
            exc = arg[1]
            if isinstance(exc, TraceLimitExceeded):
                return scope.local
            value = _exception_repr(exc, None if len(self.scopes) == 1 else cap)
            if self._value_frame(EXCEPTION_SEP, "exception", lines[frame.f_lineno], value):
                return self._stopped_tracer(scope)
            scope.raised = True
            return self._slow(scope)
        return self._slow(scope) if (scope.fresh or scope.raised) else scope.local

    def _leave(self) -> None:
        self.scopes.pop()
        if self.scopes:
            parent = self.scopes[-1]
            parent.fresh = True
            parent.frame.f_trace = self._slow(parent)
        else:
            self.done = self.stopped = True
            self.finished()

    def finished(self) -> None:
        """Called once when execution leaves the entry scope (recorded or not)."""

    # ---- stopping ------------------------------------------------------------------------
    def _stop(self) -> None:
        """The last frame broke a limit: drop it, remember why, stop the program (or, when the
        program must go on, stop recording)."""
        reason = (f"max_events ({self.limits.max_events})"
                  if len(self.frames) > self.limits.max_events
                  else f"max_bytes ({self.limits.max_bytes})")
        self.frames.pop()
        self.size -= len(self.pieces.pop())
        self.truncated = reason
        self.stopped = True
        if self.stop_program:
            raise TraceLimitExceeded(reason)
        entry = self.scopes[0]
        for scope in self.scopes[1:]:
            scope.frame.f_trace = None
        entry.frame.f_trace = self._await_return(entry)

    def _stopped_tracer(self, scope: _Scope):
        """What the current frame traces with once recording stopped (only the entry's return
        is still awaited, to know when the episode's call is over)."""
        return scope.frame.f_trace if scope is self.scopes[0] else None

    def _await_return(self, entry: _Scope):
        def await_return(frame: FrameType, event: str, arg: Any):
            if event == "return":
                self.scopes.clear()
                self.done = True
                self.finished()
                return None
            return await_return
        return await_return

    # ---- frame construction (full state frames, values) ------------------------------------
    def _full_frame(self, token: str, event: str, scope: _Scope, f_locals: dict,
                    line: str) -> bool:
        """A call or line frame with every value written in full (the line encoder with nothing
        kept to compare with); True when it broke a limit."""
        scope.objects.clear()
        scope.texts.clear()
        scope.snaps.clear()
        values, parts = scope.encode(f_locals)
        return self._keep(_new_frame(Frame, (event, values, line, None)),
                          f"{token}{{{', '.join(parts)}}}{ACTION_SEP}{line}{FRAME_SEP}")

    def _value_frame(self, token: str, event: str, line: str, value: str) -> bool:
        """A return or exception frame; True when it broke a limit (and was not kept)."""
        return self._keep(
            _new_frame(Frame, (event, None, line, value)),
            f"{token}{ACTION_SEP}{line}{ARG_SEP}{encode_basestring(value)}{FRAME_SEP}")

    def _keep(self, frame: Frame, piece: str) -> bool:
        """Record a frame and its text; True when that broke a limit (and it was dropped)."""
        self.frames.append(frame)
        self.pieces.append(piece)
        self.size += len(piece)
        if len(self.frames) > self.max_events or self.size > self.max_bytes:
            self._stop()
            return True
        return False


def def_line_number(lines: list[str], code) -> int:
    """Line number of a function's ``def`` in ``lines`` (indexed by line number)."""
    number = code.co_firstlineno
    for index in range(number, min(len(lines), number + 50)):
        if lines[index].lstrip().startswith(("def ", "async def ")):
            return index
    return number


class _FunctionRecorder(_Recorder):
    """Traces the functions of one program compiled under :data:`FILENAME`."""

    def __init__(self, lines: list[str], entry_code, limits: TraceLimits) -> None:
        super().__init__(entry_code, limits)
        self.lines = [""] + lines          # indexed by line number

    def code_info(self, code) -> tuple | None:
        if code.co_filename != FILENAME or (code is not self.entry_code and self.skipped(code)):
            return None
        return self.lines, self.call_line(self.lines, code)


# --------------------------------------------------------------------------------------------
# Episodes: calls from a test suite into a repository's functions (repository-level traces)

_NOT_ENTRIES = 0x20 | 0x80 | 0x200   # CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class Episode:
    """One traced call of a repository function made directly by a test."""

    path: str                 # the entry's file, relative to the repository root
    entry: str                # qualified name (``Stack.push``)
    source: str               # the entry's module source, entry ``def`` line marked
    test: str                 # the test that made the call
    result: TraceResult

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "entry": self.entry, "source": self.source,
                "test": self.test, "result": self.result.to_json()}


class _EpisodeRecorder(_Recorder):
    """One episode: never stops the program (the test suite must go on); a limit only stops
    recording. Line texts come from the repository's files, the entry's file marked."""

    def __init__(self, tracer: EpisodeTracer, entry_code, marked_lines: list[str]) -> None:
        super().__init__(entry_code, tracer.limits, stop_program=False)
        self.tracer = tracer
        self.marked_lines = marked_lines
        self.lines = [""] + [action_line(line) for line in marked_lines[1:]]
        self.rng = tracer.rng if tracer.limits.step_in_probability < 1.0 else None

    def code_info(self, code) -> tuple | None:
        if self.tracer.kind(code) != "source" or self.skipped(code):
            return None
        lines = (self.lines if code.co_filename == self.entry_code.co_filename
                 else self.tracer.lines_of(code.co_filename))
        return (lines, self.call_line(lines, code)) if lines else None

    def finished(self) -> None:
        self.tracer.episode_done(self)


class EpisodeTracer:
    """Cuts a running test suite into per-function episodes (CWM's repository-level traces).

    While started (around each test's call phase), every call that a test makes *directly* into
    a function defined in the repository (not in a test file) is traced as an episode: the
    entry's module source is the context, callees in the repository are stepped into up to
    ``limits.max_depth`` levels, each with probability ``limits.step_in_probability``. At most
    ``per_function`` episodes are kept per function and ``max_episodes`` in all; ``emit`` gets
    each finished :class:`Episode`. Object addresses in reprs (`` at 0x7f3a…``) are replaced by
    `` at 0x...`` so that the same call traces to the same text in every run."""

    def __init__(self, root: str, limits: TraceLimits, emit, *, per_function: int = 3,
                 max_episodes: int = 1000) -> None:
        self.root = os.path.realpath(root) + os.sep
        self.limits = limits
        self.emit = emit
        self.per_function = per_function
        self.max_episodes = max_episodes
        self.rng = random.Random(limits.seed)
        self.kinds: dict[int, tuple] = {}       # id(code) -> (code, "source" | "test" | "other")
        self.files: dict[str, list[str] | None] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.emitted = 0
        self.active: _EpisodeRecorder | None = None
        self.test = ""

    # ---- classification (cached per code object and per file) -----------------------------
    def kind(self, code) -> str:
        known = self.kinds.get(id(code))
        if known is None or known[0] is not code:
            known = self.kinds[id(code)] = (code, self._classify(code.co_filename))
        return known[1]

    def _classify(self, filename: str) -> str:
        real = os.path.realpath(filename)
        if not real.startswith(self.root) or not real.endswith(".py"):
            return "other"
        return "test" if is_test_path(real[len(self.root):]) else "source"

    def lines_of(self, filename: str) -> list[str] | None:
        if filename not in self.files:
            try:
                with open(filename, encoding="utf-8") as f:
                    self.files[filename] = [""] + [f"{line}\n" for line in f.read().split("\n")]
            except (OSError, UnicodeDecodeError):
                self.files[filename] = None
        return self.files[filename]

    # ---- tracing ---------------------------------------------------------------------------
    def start(self, test: str) -> None:
        self.test = test
        self.active = None
        _ACTIVE[0] = None
        sys.settrace(self.on_call)

    def stop(self) -> None:
        sys.settrace(None)
        self.active = None

    def on_call(self, frame: FrameType, event: str, arg: Any):
        active = self.active
        if active is not None:
            if not active.done:
                return active.on_call(frame, event, arg)
            self.active = None
        if self.emitted >= self.max_episodes:
            return None
        code = frame.f_code
        if self.kind(code) != "source" or code.co_flags & _NOT_ENTRIES:
            return None
        back = frame.f_back
        if back is None or self.kind(back.f_code) != "test":
            return None
        key = (code.co_filename, code.co_qualname)
        if self.counts.get(key, 0) >= self.per_function or code.co_name.startswith("<"):
            return None
        lines = self.lines_of(code.co_filename)
        if lines is None:
            return None
        self.counts[key] = self.counts.get(key, 0) + 1
        # lines_of's lines carry their newline (the action text): the context is the file.
        marked = mark_line("".join(lines[1:])[:-1], def_line_number(lines, code))
        recorder = self.active = _EpisodeRecorder(self, code, [""] + marked.split("\n"))
        recorder.size = len(trace_prompt(marked))
        return recorder.on_call(frame, event, arg)

    def episode_done(self, recorder: _EpisodeRecorder) -> None:
        """The entry returned (or raised): build the episode and hand it on."""
        code = recorder.entry_code
        marked = "\n".join(recorder.marked_lines[1:])
        frames = [Frame(e, None if v is None else
                        {k: _ADDRESS.sub(" at 0x...", t) for k, t in v.items()}, line,
                        None if value is None else _ADDRESS.sub(" at 0x...", value))
                  for e, v, line, value in recorder.frames]
        complete = recorder.truncated is None
        final = final_value(frames) if complete else None
        returned = final[1] if final is not None and final[0] == "return" else None
        raised = final[1] if final is not None and final[0] == "exception" else None
        # Built from the cleaned frames, so that the text is exactly encode_trace(marked, frames).
        text = trace_prompt(marked) + encode_frames(frames) + (END_OF_TEXT if complete else "")
        result = TraceResult(frames, text, returned, raised, recorder.truncated, len(frames),
                             None)
        path = os.path.realpath(code.co_filename)[len(self.root):]
        self.emitted += 1
        self.emit(Episode(path, code.co_qualname, marked, self.test, result))


def is_test_path(relative: str) -> bool:
    """Test modules and pytest configuration (never episode entries or step-in targets)."""
    parts = relative.replace(os.sep, "/").split("/")
    name = parts[-1]
    return (name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"
            or any(p in ("tests", "test", "testing") for p in parts[:-1]))


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
                   limits: TraceLimits = TraceLimits(), marked: str | None = None) -> TraceResult:
    """Execute ``source``, call ``entry(<args_src>)`` under the tracer and return the trace.

    ``marked`` is ``mark_entry(source, entry)`` where the caller has it already (the sandbox
    pool marks programs before sending them: parsing needs no sandbox, and building the syntax
    tree in a freshly forked child was its costliest step, most of it copy-on-write faults).

    Raises :class:`ProgramError` when the program cannot even be set up (syntax error, no such
    function, input that does not evaluate); anything the call itself raises is part of the
    trace."""
    try:
        if marked is None:
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
               limits: TraceLimits = TraceLimits(), *,
               accelerated: bool | None = None) -> TraceResult:
    """Call ``function`` (compiled from ``marked_source`` under :data:`FILENAME`) under the
    tracer. Split from :func:`trace_function` so the benchmark can time the traced call alone.

    ``accelerated`` picks the recorder: the C one (``cwm_exec._ctracer``, the default where it
    was built) or the Python reference (:class:`_FunctionRecorder`); both give the same result."""
    if accelerated is None:
        accelerated = ACCELERATED
    recorder = _new_recorder(function, _action_lines(marked_source), limits, accelerated)
    head = trace_prompt(marked_source)
    recorder.size = len(head)
    return_repr, exception, exception_type = _run_traced(recorder, function, args, kwargs,
                                                         accelerated)
    frames = recorder.frames
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


def _action_lines(marked: str) -> list[str]:
    """Action texts: the source lines with their newline, the entry's def line without the
    marker (CWM keeps the marker in the context only; see trace_format)."""
    lines = [f"{line}\n" for line in marked.split("\n")]
    at = marked.find(START_MARKER)
    if at >= 0:
        number = marked.count("\n", 0, at)
        lines[number] = action_line(lines[number])
    return lines


def _new_recorder(function, lines: list[str], limits: TraceLimits, accelerated: bool):
    """The C recorder or the Python reference one, for a call of ``function``."""
    if not accelerated:
        return _FunctionRecorder(lines, function.__code__, limits)
    return _ctracer.Recorder(
        function.__code__, FILENAME, [""] + lines,
        _SKIPPED_SCOPES - {"<lambda>"} if limits.trace_lambdas else _SKIPPED_SCOPES,
        (random.Random(limits.seed).random if limits.step_in_probability < 1.0 else None),
        limits.step_in_probability, limits.max_depth, limits.max_repr_chars,
        limits.max_events, limits.max_bytes)


def _run_traced(recorder, function, args: tuple, kwargs: dict,
                accelerated: bool) -> tuple[str | None, str | None, str | None]:
    """Run the call under ``recorder``: ``(return repr, exception repr, exception type)``."""
    return_repr = exception = exception_type = None
    _ACTIVE[0] = recorder
    # No cyclic garbage collection while tracing: a collection at an arbitrary line could run
    # finalizers and weakref callbacks inside the traced code (traces would differ from run to
    # run), and the tracer's own frames would trigger collections. The sandbox's memory limit
    # still bounds a program that makes cyclic garbage.
    collecting = gc.isenabled()
    gc.disable()
    if accelerated:
        recorder.start()
    else:
        sys.settrace(recorder.on_call)
    try:
        value = function(*args, **kwargs)
    except TraceLimitExceeded:
        pass
    except BaseException as err:  # the traced program's exception is data, not our failure
        exception, exception_type = _exception_repr(err, None), type(err).__name__
    else:
        if recorder.truncated:
            return_repr = None
        elif recorder.done and recorder.frames and recorder.frames[-1].event == "return":
            return_repr = recorder.frames[-1].value   # the entry's return frame: already repr'd
        else:
            return_repr = repr(value)
    finally:
        sys.settrace(None)
        _ACTIVE[0] = None
        if collecting:
            gc.enable()
    return return_repr, exception, exception_type


# The C recorder (built from _ctracer.c at install time; optional, so an install without a
# compiler still works, with the Python recorder and its ~2x higher tracing cost).
try:
    from cwm_exec import _ctracer  # type: ignore[attr-defined]  # a C extension: no stubs
except ImportError:   # pragma: no cover - depends on the install
    _ctracer = None
else:
    _ctracer.configure(
        frame_type=Frame, limit_exceeded=TraceLimitExceeded, encode_string=encode_basestring,
        unchanged=UNCHANGED, truncation_marker=TRUNCATION_MARKER,
        tokens=(CALL_SEP, LINE_SEP, RETURN_SEP, EXCEPTION_SEP, ACTION_SEP, ARG_SEP, FRAME_SEP))
ACCELERATED = _ctracer is not None and os.environ.get("CWM_TRACER") != "python"
