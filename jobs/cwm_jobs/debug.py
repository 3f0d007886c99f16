"""The neural debugger: step through the execution trace a model *predicts*, with CWM's protocol.

    cwm debug runs/tiny/artifacts/rl/checkpoint examples/debug/collatz.py:steps --args 6 --real
    cwm debug examples/debug/collatz.py:steps --endpoint http://127.0.0.1:8000/v1 --tokenizer tok/

The protocol is CWM's demo debugger's (github.com/facebookresearch/cwm ``demos/cwmdbg.py``,
``CWMDebugger``): the prompt is ``<|begin_of_text|><|trace_context_start|>SOURCE<|frame_sep|>``
plus the frames so far, built from token ids (special tokens from structure, never from text);
the model continues one frame at a time up to ``<|frame_sep|>`` (``<|end_of_text|>``: the call is
over), and the debugger forces the next event token where the command requires one:

    reset          the model predicts the call frame (forced ``<|call_sep|>``), unless real
                   arguments were given (``--args``): then the real call frame starts the session
    s, step        step into: after a call frame, force ``<|line_sep|>``; else predict freely
    n, next        predict one frame; if it is a call, force ``<|return_sep|>`` (the callee's
                   result, its body skipped) and predict one more frame
    o, out         predict until the current function returns (calls stepped over as in next),
                   then one frame more
    b, back        drop the last frame
    p NAME         print NAME as the model believes it is now (``".."`` resolved)
    l, locals      print all locals of the current frame
    real           toggle showing the real trace beside the prediction
    q, quit

The model runs here (a checkpoint) or behind any OpenAI-compatible ``/completions`` endpoint
that takes token-id prompts: ``cwm serve``, CWM's ``fgserve``, or vLLM serving released CWM
(:func:`endpoint_completer`). The real trace is computed by running the function in the sandbox
(it is the user's code: never run outside it).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cwm_exec.sandbox import Failure, Limits, TracePool
from cwm_exec.trace_format import (
    ACTION_SEP,
    ARG_SEP,
    CALL_SEP,
    END_OF_TEXT,
    EVENT_TOKEN,
    FRAME_SEP,
    LINE_SEP,
    RETURN_SEP,
    TOKEN_EVENT,
    UNCHANGED,
    Frame,
    mark_entry,
    trace_parts,
)
from cwm_model.tokenizer import CWMTokenizer
from cwm_spec import storage

# prompt token ids -> the continuation's ids, through <|frame_sep|> or <|end_of_text|>
Completer = Callable[[list[int]], list[int]]
MAX_STEPS_PER_COMMAND = 500


class MalformedFrame(ValueError):
    """The model's continuation is not one frame."""


def frame_from_ids(tokenizer: Any, ids: Sequence[int]) -> Frame:
    """One predicted frame from its token ids (event token first), split at the special ids as
    ``cwmdbg.py`` does, so text that spells a token cannot shift the fields."""
    special = {tokenizer.token_id(t): t for t in (*EVENT_TOKEN.values(), ACTION_SEP, ARG_SEP,
                                                   FRAME_SEP)}
    if not ids or special.get(ids[0]) not in TOKEN_EVENT:
        raise MalformedFrame("the frame does not start with an event token")
    event = TOKEN_EVENT[special[ids[0]]]
    fields: list[list[int]] = [[]]
    seps: list[str] = []
    for token in ids[1:]:
        name = special.get(token)
        if name == FRAME_SEP:
            break
        if name in (ACTION_SEP, ARG_SEP):
            seps.append(name)
            fields.append([])
        elif name is not None:
            raise MalformedFrame(f"unexpected {name} inside a frame")
        else:
            fields[-1].append(token)
    texts = [tokenizer.decode(f) for f in fields]
    try:
        if event in ("call", "line"):
            if seps != [ACTION_SEP]:
                raise MalformedFrame(f"a {event} frame needs locals, <|action_sep|> and a line")
            values = json.loads(texts[0])
            if not isinstance(values, dict):
                raise MalformedFrame("locals are not a JSON object")
            return Frame(event, {str(k): str(v) for k, v in values.items()}, texts[1])
        if seps != [ACTION_SEP, ARG_SEP] or texts[0]:
            raise MalformedFrame(f"a {event} frame needs <|action_sep|> LINE <|arg_sep|> VALUE")
        value = json.loads(texts[2])
        return Frame(event, None, texts[1], value if isinstance(value, str) else json.dumps(value))
    except json.JSONDecodeError as err:
        raise MalformedFrame(f"not JSON ({err})") from None


@dataclass
class DebugSession:
    """CWM's stepping logic over a token-level completer (pure but for the completer)."""

    marked_source: str
    tokenizer: Any
    complete: Completer
    call_frame: Frame | None = None   # the real call frame, or None: the model predicts it
    frames: list[Frame] = field(default_factory=list)
    finished: bool = False
    error: str | None = None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.frames, self.finished, self.error = [], False, None
        if self.call_frame is not None:
            self.frames.append(self.call_frame)
        else:
            self._step(CALL_SEP)

    @property
    def current(self) -> Frame | None:
        return self.frames[-1] if self.frames else None

    def _prompt(self, forced: str | None) -> list[int]:
        parts = trace_parts(self.marked_source, self.frames, complete=False)
        return self.tokenizer.encode_parts(parts + ([(forced, True)] if forced else []))

    def _step(self, forced: str | None = None) -> Frame | None:
        """Predict one frame (its event forced when given); None at the end or on an error."""
        if self.finished:
            return None
        out = self.complete(self._prompt(forced))
        ids = ([self.tokenizer.token_id(forced)] if forced else []) + list(out)
        if not forced and out and out[0] == self.tokenizer.eos_id:
            self.finished = True
            return None
        try:
            frame = frame_from_ids(self.tokenizer, ids)
        except MalformedFrame as err:
            self.error, self.finished = f"the model predicted a malformed frame ({err})", True
            return None
        self.frames.append(frame)
        return frame

    def step(self) -> list[Frame]:
        """Step into: after a call frame the next frame is forced to be a line of the callee."""
        current = self.current
        frame = self._step(LINE_SEP if current is not None and current.event == "call" else None)
        return [frame] if frame else []

    def next(self) -> list[Frame]:
        """Step over: a call is answered by its return frame right away, then one more frame."""
        frame = self._step()
        shown = [frame] if frame else []
        if frame is not None and frame.event == "call":
            shown += [f for f in (self._step(RETURN_SEP), self._step()) if f]
        return shown

    def out(self) -> list[Frame]:
        """Until the current function returns, then one frame more (``step_out``). Calls are
        stepped over by forcing their return; unlike ``cwmdbg.py``, whose loop also stops at
        such a callee's return, only the current function's own return ends the command."""
        shown: list[Frame] = []
        start = len(self.frames)
        for _ in range(MAX_STEPS_PER_COMMAND):
            current = self.current
            at_call = current is not None and current.event == "call"
            frame = self._step(RETURN_SEP if at_call else None)
            if frame is None:
                break
            shown.append(frame)
            # A call predicted during this command is a callee: its forced return goes on.
            callee = at_call and len(self.frames) - 2 >= start
            if frame.event == "return" and not callee:
                shown += [f for f in (self._step(),) if f]
                break
        return shown

    def back(self) -> None:
        if len(self.frames) > 1:
            self.frames.pop()
            self.finished, self.error = False, None

    def locals(self) -> dict[str, str]:
        """The current frame's locals with ``".."`` resolved from earlier frames of the same
        scope (``CWMDebugger.local_vars``); a return or exception frame shows its scope's."""
        index = len(self.frames) - 1
        while index > 0 and self.frames[index].event in ("return", "exception"):
            index -= 1
        if index < 0:
            return {}
        values = dict(self.frames[index].locals or {})
        for name, value in values.items():
            if value != UNCHANGED:
                continue
            for earlier in reversed(self.frames[:index]):
                found = (earlier.locals or {}).get(name, UNCHANGED)
                if found != UNCHANGED:
                    values[name] = found
                    break
                if earlier.event in ("call", "return"):   # the scope changed: stop looking
                    break
        return values

    def value(self, name: str) -> str | None:
        return self.locals().get(name)


def model_completer(checkpoint: str, *, max_new_tokens: int = 256) -> tuple[Completer, Any]:
    """Greedy continuation with a trained checkpoint; also returns its tokenizer."""
    import torch  # noqa: PLC0415 (torch: `cwm debug --endpoint` runs without it)

    from cwm_model.checkpoint import load_checkpoint  # noqa: PLC0415 (imports torch)
    from cwm_model.generate import generate  # noqa: PLC0415 (imports torch)

    model, tokenizer, _ = load_checkpoint(storage.local_copy(str(checkpoint)))  # path or URI
    if tokenizer is None:
        raise SystemExit(f"{checkpoint}: the checkpoint has no tokenizer")
    model.eval()
    stops = (tokenizer.token_id(FRAME_SEP), tokenizer.eos_id)

    def complete(prompt: list[int]) -> list[int]:
        with torch.no_grad():
            rows = generate(model, [prompt], max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_ids=stops)
        return cast(list[list[int]], rows)[0]  # no log-probabilities asked for

    return complete, tokenizer


def endpoint_completer(base_url: str, model: str, tokenizer: Any, *, max_new_tokens: int = 256,
                       temperature: float = 0.0, timeout: float = 120.0) -> Completer:
    """Continuation from an OpenAI-compatible ``/completions`` endpoint given token-id prompts,
    stopping at ``<|frame_sep|>`` as ``cwmdbg.py`` asks ``fgserve``. The reply's ``tokens``
    (``cwm serve``, ``fgserve``) are used as they are; a server that returns only text (vLLM,
    asked for ``skip_special_tokens: false``) has it re-tokenised with the special tokens parsed
    from the text, which a value spelling a special token could confuse: prefer ``tokens``."""
    url = base_url.rstrip("/") + "/completions"
    stops = [FRAME_SEP, END_OF_TEXT]

    def complete(prompt: list[int]) -> list[int]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens,
                "temperature": temperature, "stop": stops, "skip_special_tokens": False,
                "include_stop_str_in_output": True}
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            choice = json.loads(response.read())["choices"][0]
        if isinstance(choice.get("tokens"), list):
            return [int(t) for t in choice["tokens"]]
        return tokenizer.tokenizer.encode(choice.get("text", ""), add_special_tokens=False).ids

    return complete


def real_trace(source: str, entry: str, args_src: str):
    """The real trace, computed in the sandbox."""
    with TracePool(Limits(wall_seconds=20, cpu_seconds=20)) as pool:
        result = pool.trace(source, entry, args_src)
    if isinstance(result, Failure):
        raise SystemExit(f"cannot trace {entry}({args_src}): {result.reason} {result.detail}")
    return result


def describe(frame: Frame | None) -> str:
    if frame is None:
        return "(end)"
    if frame.event in ("return", "exception"):
        return f"{frame.event:9} {frame.line.strip()}  -> {frame.value}"
    changed = {k: v for k, v in (frame.locals or {}).items() if v != UNCHANGED}
    shown = ", ".join(f"{k}={v}" for k, v in changed.items())
    return f"{frame.event:9} {frame.line.strip()}" + (f"   [{shown}]" if shown else "")


def align(frames: Sequence[Frame], real: Sequence[Frame]) -> list[int]:
    """The real frame index each session frame stands for: in order, except that a return right
    after a call (``next`` forced it) stands for that call's real return, its body skipped."""
    out: list[int] = []
    for i, frame in enumerate(frames):
        j = out[-1] + 1 if out else 0
        if (frame.event == "return" and i and frames[i - 1].event == "call"
                and j < len(real) and real[j].event != "return"):
            depth = 1
            while j < len(real):
                depth += {"call": 1, "return": -1}.get(real[j].event, 0)
                if depth == 0:
                    break
                j += 1
        out.append(j)
    return out


def interact(session: DebugSession, commands: Iterable[str], real: list[Frame] | None,
             show_real: bool, out=sys.stdout) -> None:
    def show(frames: Sequence[Frame]) -> None:
        positions = align(session.frames, real) if real is not None else []
        for frame in frames:
            index = len(session.frames) - 1 - session.frames[::-1].index(frame)
            line = f"{index:4}  model: {describe(frame)}"
            if show_real and real is not None:
                at = positions[index]
                truth = real[at] if at < len(real) else None
                line += f"\n      {'==' if truth == frame else '!='} real: {describe(truth)}"
            print(line, file=out)
        if session.error:
            print(session.error, file=out)
        elif session.finished:
            print("(the model says the call is over)", file=out)

    show(session.frames[:1])
    for raw in commands:
        cmd, _, arg = raw.strip().partition(" ")
        if cmd in ("s", "step"):
            show(session.step())
        elif cmd in ("n", "next"):
            show(session.next())
        elif cmd in ("o", "out"):
            show(session.out())
        elif cmd in ("b", "back"):
            session.back()
            show(session.frames[-1:])
        elif cmd in ("p", "print"):
            value = session.value(arg.strip())
            print(f"{arg.strip()} = {value}" if value is not None
                  else f"{arg.strip()!r} is not a local here", file=out)
        elif cmd in ("l", "locals"):
            print(", ".join(f"{k}={v}" for k, v in session.locals().items()), file=out)
        elif cmd in ("r", "reset"):
            session.reset()
            show(session.frames[:1])
        elif cmd == "real":
            show_real = not show_real
            print(f"real trace {'shown' if show_real else 'hidden'}", file=out)
        elif cmd in ("q", "quit", "exit"):
            return
        elif cmd:
            print(f"unknown command {cmd!r} (s, n, o, b, p NAME, l, r, real, q)", file=out)


def _prompt_lines() -> Iterable[str]:
    while True:
        try:
            yield input("(cwm-debug) ")
        except EOFError:
            return


def parse_target(target: str) -> tuple[Path, str]:
    path, sep, function = target.rpartition(":")
    if not sep or not path or not function.isidentifier():
        raise SystemExit(f"expected FILE.py:FUNCTION, got {target!r}")
    return Path(path), function


def _completer(args: argparse.Namespace) -> tuple[Completer, Any]:
    if args.endpoint:
        if not args.tokenizer:
            raise SystemExit("--endpoint needs --tokenizer (the served model's tokenizer.json)")
        tokenizer = CWMTokenizer.load(args.tokenizer)
        return endpoint_completer(args.endpoint, args.model, tokenizer,
                                  max_new_tokens=args.max_new_tokens), tokenizer
    if not args.checkpoint:
        raise SystemExit("give a checkpoint folder, or --endpoint and --tokenizer")
    return model_completer(args.checkpoint, max_new_tokens=args.max_new_tokens)


def run(args: argparse.Namespace) -> int:
    path, entry = parse_target(args.target)
    try:
        source = path.read_text()
    except OSError as err:
        print(f"error: {path}: {err.strerror}", file=sys.stderr)
        return 1
    truth = real_trace(source, entry, args.args) if args.args is not None else None
    if truth is not None and not truth.frames:
        print(f"error: {entry}({args.args}) produced no trace", file=sys.stderr)
        return 1
    complete, tokenizer = _completer(args)
    session = DebugSession(mark_entry(source, entry), tokenizer, complete,
                           truth.frames[0] if truth is not None else None)
    commands = (args.commands.split(";") if args.commands is not None
                else (_prompt_lines() if sys.stdin.isatty() else sys.stdin))
    interact(session, commands, truth.frames if truth is not None else None, args.real)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("debug", help="step through a model's predicted execution trace",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a model checkpoint folder (with its tokenizer)")
    p.add_argument("target", help="FILE.py:FUNCTION")
    p.add_argument("--endpoint", help="an OpenAI-compatible base URL instead of a checkpoint")
    p.add_argument("--model", default="cwm", help="the model name to ask the endpoint for")
    p.add_argument("--tokenizer", help="tokenizer.json (or its folder) of the endpoint's model")
    p.add_argument("--args", default=None,
                   help="real call arguments as Python source, e.g. '[3, 1], 2' (the real call "
                        "frame starts the session; without it the model predicts the call)")
    p.add_argument("--real", action="store_true", help="show the real trace beside")
    p.add_argument("--commands", default=None,
                   help="run these commands (';'-separated) instead of reading them")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=run)
