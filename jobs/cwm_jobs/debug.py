"""The neural debugger: step through the execution trace a trained model *predicts*.

    cwm debug runs/tiny/artifacts/rl/checkpoint examples/debug/collatz.py:steps --args 6 --real

Like CWM's demo, the model plays the interpreter: given the source (entry marked) and the call
frame with the real arguments, it predicts the next frame — which line runs and the locals before
it — one at a time. Commands:

    s, step        predict one frame
    n, next        predict until the next line of this function (calls are stepped over)
    o, out         predict until the current function returns
    p NAME         print NAME as the model believes it is now
    l, locals      print all locals of the current frame
    r, reset       start again from the call
    real           toggle showing the real trace beside the prediction
    q, quit

The real trace is computed by running the function in the sandbox (it is the user's code: never
run outside it); its call frame is the prediction's starting point, and with ``--real`` each
predicted frame is shown next to the real frame at the same position.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cwm_exec.trace_format import (
    END_OF_TEXT,
    FRAME_SEP,
    UNCHANGED,
    Frame,
    TraceFormatError,
    encode_frames,
    parse_frame,
    trace_prompt,
)

# (text so far) -> the next frame's text without <|frame_sep|>, or None at <|end_of_text|>
FramePredictor = Callable[[str], "str | None"]
MAX_STEPS_PER_COMMAND = 500


@dataclass
class Scopes:
    """Resolved locals per active call: ``".."`` means the value of the previous frame."""

    stack: list[dict[str, str]] = field(default_factory=list)

    def apply(self, frame: Frame) -> None:
        if frame.event == "call":
            self.stack.append({})
        if frame.locals is not None and self.stack:
            current = self.stack[-1]
            for name, value in frame.locals.items():
                if value != UNCHANGED:
                    current[name] = value
        if frame.event in ("return", "exception") and self.stack:
            self.stack.pop()

    @property
    def depth(self) -> int:
        return len(self.stack)

    @property
    def current(self) -> dict[str, str]:
        return self.stack[-1] if self.stack else {}


@dataclass
class DebugSession:
    """The stepping logic, independent of where frames come from (pure but for the predictor)."""

    marked_source: str
    call_frame: Frame
    predict: FramePredictor
    frames: list[Frame] = field(default_factory=list)
    scopes: Scopes = field(default_factory=Scopes)
    finished: bool = False
    error: str | None = None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.frames, self.scopes, self.finished, self.error = [], Scopes(), False, None
        self._push(self.call_frame)

    def _push(self, frame: Frame) -> None:
        self.frames.append(frame)
        self.scopes.apply(frame)
        if self.scopes.depth == 0:
            self.finished = True

    def prefix(self) -> str:
        return trace_prompt(self.marked_source) + encode_frames(self.frames)

    def step(self) -> Frame | None:
        """Predict one frame; None when the trace is over or the model's output is malformed."""
        if self.finished:
            return None
        text = self.predict(self.prefix())
        if text is None:
            self.finished = True
            return None
        try:
            frame = parse_frame(text, len(self.frames))
        except TraceFormatError as err:
            self.error, self.finished = f"the model predicted a malformed frame ({err})", True
            return None
        self._push(frame)
        return frame

    def _until(self, done: Callable[[Frame, int, int], bool]) -> list[Frame]:
        """Step until ``done(frame, owner_depth, start_depth)``; a frame's owner is the call it
        belongs to (a callee's return frame belongs to the callee, not to the caller)."""
        start, shown = self.scopes.depth, []
        for _ in range(MAX_STEPS_PER_COMMAND):
            before = self.scopes.depth
            frame = self.step()
            if frame is None:
                break
            shown.append(frame)
            owner = self.scopes.depth if frame.event == "call" else before
            if done(frame, owner, start):
                break
        return shown

    def next(self) -> list[Frame]:
        """Step over calls: stop at the next line (or exit) of the current function."""
        return self._until(lambda f, owner, d: owner < d or (
            owner == d and f.event in ("line", "return", "exception")))

    def out(self) -> list[Frame]:
        """Run until the current function returns or raises."""
        return self._until(lambda f, owner, d: owner <= d and f.event in ("return", "exception"))

    def value(self, name: str) -> str | None:
        return self.scopes.current.get(name)


def model_predictor(checkpoint: str, *, max_new_tokens: int = 256) -> FramePredictor:
    """Greedy next-frame prediction with a trained checkpoint."""
    import torch

    from cwm_model.checkpoint import load_checkpoint
    from cwm_model.generate import generate

    model, tokenizer, _ = load_checkpoint(checkpoint)
    if tokenizer is None:
        raise SystemExit(f"{checkpoint}: the checkpoint has no tokenizer")
    model.eval()
    frame_sep, eot = tokenizer.token_id(FRAME_SEP), tokenizer.token_id(END_OF_TEXT)

    def predict(prefix: str) -> str | None:
        ids = tokenizer.encode(prefix)
        with torch.no_grad():
            out = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=0.0,
                           stop_ids=(frame_sep, eot))[0]
        if not out or out[-1] == eot:
            return None
        return tokenizer.decode(out[:-1] if out[-1] == frame_sep else out)

    return predict


def real_trace(source: str, entry: str, args_src: str):
    """The real trace, computed in the sandbox."""
    from cwm_exec.sandbox import Failure, Limits, TracePool

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


def interact(session: DebugSession, commands: Iterable[str], real: list[Frame] | None,
             show_real: bool, out=sys.stdout) -> None:
    def show(frames: Sequence[Frame]) -> None:
        for frame in frames:
            index = session.frames.index(frame)
            line = f"{index:4}  model: {describe(frame)}"
            if show_real and real is not None:
                truth = real[index] if index < len(real) else None
                mark = "==" if truth == frame else "!="
                line += f"\n      {mark} real: {describe(truth)}"
            print(line, file=out)
        if session.error:
            print(session.error, file=out)
        elif session.finished and frames:
            print("(the model says the call is over)", file=out)

    show([session.frames[0]])
    for raw in commands:
        cmd, _, arg = raw.strip().partition(" ")
        if cmd in ("s", "step"):
            frame = session.step()
            show([frame] if frame else [])
        elif cmd in ("n", "next"):
            show(session.next())
        elif cmd in ("o", "out"):
            show(session.out())
        elif cmd in ("p", "print"):
            value = session.value(arg.strip())
            print(f"{arg.strip()} = {value}" if value is not None
                  else f"{arg.strip()!r} is not a local here", file=out)
        elif cmd in ("l", "locals"):
            print(", ".join(f"{k}={v}" for k, v in session.scopes.current.items()), file=out)
        elif cmd in ("r", "reset"):
            session.reset()
            show([session.frames[0]])
        elif cmd == "real":
            show_real = not show_real
            print(f"real trace {'shown' if show_real else 'hidden'}", file=out)
        elif cmd in ("q", "quit", "exit"):
            return
        elif cmd:
            print(f"unknown command {cmd!r} (s, n, o, p NAME, l, r, real, q)", file=out)


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


def run(args: argparse.Namespace) -> int:
    path, entry = parse_target(args.target)
    try:
        source = path.read_text()
    except OSError as err:
        print(f"error: {path}: {err.strerror}", file=sys.stderr)
        return 1
    truth = real_trace(source, entry, args.args)
    if not truth.frames:
        print(f"error: {entry}({args.args}) produced no trace", file=sys.stderr)
        return 1
    from cwm_exec.trace_format import mark_entry

    session = DebugSession(mark_entry(source, entry), truth.frames[0],
                           model_predictor(args.checkpoint, max_new_tokens=args.max_new_tokens))
    commands = (args.commands.split(";") if args.commands is not None
                else (_prompt_lines() if sys.stdin.isatty() else sys.stdin))
    interact(session, commands, truth.frames, args.real)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("debug", help="step through a model's predicted execution trace",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="a model checkpoint folder (with its tokenizer)")
    p.add_argument("target", help="FILE.py:FUNCTION")
    p.add_argument("--args", default="", help="call arguments as Python source, e.g. '[3, 1], 2'")
    p.add_argument("--real", action="store_true", help="show the real trace beside")
    p.add_argument("--commands", default=None,
                   help="run these commands (';'-separated) instead of reading them")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=run)
