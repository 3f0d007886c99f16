"""The neural debugger's stepping logic, driven by an oracle that predicts the real trace
(computed in the sandbox), so every command's expected stop is known exactly."""

from __future__ import annotations

import io

import pytest

from cwm_exec.trace_format import FRAME_SEP, encode_frame, mark_entry, parse_trace
from cwm_jobs.debug import DebugSession, interact, real_trace

SOURCE = '''\
def square(v):
    r = v * v
    return r

def f(xs):
    total = 0
    for x in xs:
        total += square(x)
    return total
'''


@pytest.fixture(scope="module")
def truth():
    return real_trace(SOURCE, "f", "[1, 2]")


def oracle(truth):
    """Predicts exactly the real next frame (the position is read off the prefix)."""
    def predict(prefix: str):
        done = prefix.count(FRAME_SEP) - 1  # the prompt ends with one frame_sep
        if done >= len(truth.frames):
            return None
        return encode_frame(truth.frames[done])[: -len(FRAME_SEP)]
    return predict


def test_real_trace_runs_in_the_sandbox(truth):
    assert truth.return_repr == "5"
    assert truth.frames[0].event == "call" and truth.frames[0].locals == {"xs": "[1, 2]"}


def test_step_predicts_frames_in_order(truth):
    session = DebugSession(mark_entry(SOURCE, "f"), truth.frames[0], oracle(truth))
    steps = [session.step() for _ in range(len(truth.frames) - 1)]
    assert steps == truth.frames[1:]
    assert session.finished and session.step() is None


def test_next_steps_over_calls_and_out_returns(truth):
    session = DebugSession(mark_entry(SOURCE, "f"), truth.frames[0], oracle(truth))
    lines = [f.line.strip() for f in session.next()]
    assert lines == ["total = 0"]
    session.next(); session.next()  # for x in xs / total += square(x)
    assert session.frames[-1].line.strip() == "total += square(x)"
    stepped = session.next()  # over the call to square: back in f
    assert stepped[0].event == "call" and stepped[-1].line.strip() == "for x in xs:"
    assert session.value("total") == "1"
    session.out()
    assert session.finished and session.frames[-1].event == "return"
    assert session.frames[-1].value == "5"


def test_reset_and_malformed_prediction(truth):
    session = DebugSession(mark_entry(SOURCE, "f"), truth.frames[0], lambda prefix: "garbage")
    assert session.step() is None and "malformed" in session.error
    session.reset()
    assert session.error is None and len(session.frames) == 1


def test_interactive_commands_show_model_and_real(truth):
    session = DebugSession(mark_entry(SOURCE, "f"), truth.frames[0], oracle(truth))
    out = io.StringIO()
    interact(session, ["s", "p xs", "n", "o", "bogus"], truth.frames, True, out)
    text = out.getvalue()
    assert "== real: line      total = 0" in text
    assert "xs = [1, 2]" in text
    assert "return    return total  -> 5" in text
    assert "unknown command 'bogus'" in text
    assert "!=" not in text
