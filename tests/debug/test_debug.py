"""The neural debugger speaks CWM's protocol (github.com/facebookresearch/cwm ``demos/cwmdbg.py``):
token-id prompts, the model predicting the call frame, ``step`` forcing ``<|line_sep|>`` after a
call and ``next`` forcing ``<|return_sep|>``. An oracle completer that answers with the real
trace (computed in the sandbox) makes every command's expected stop known exactly; the last test
drives a model behind ``cwm serve`` over HTTP."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from cwm_exec.trace_format import (
    CALL_SEP,
    LINE_SEP,
    RETURN_SEP,
    frame_parts,
    mark_entry,
    trace_parts,
)
from cwm_jobs.debug import (
    DebugSession,
    align,
    endpoint_completer,
    frame_from_ids,
    interact,
    real_trace,
)
from cwm_model.tokenizer import train_tokenizer

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


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([SOURCE, '{"xs": "[1, 2]", "total": "0"}'], vocab_size=300)


class Oracle:
    """Answers a prompt with the real frame it stands for (``align``), or ``<|end_of_text|>``;
    records which event each prompt forced."""

    def __init__(self, tokenizer, real):
        self.tokenizer, self.real, self.forced, self.session = tokenizer, real, [], None

    def __call__(self, prompt):
        tok = self.tokenizer
        events = {tok.token_id(t): t for t in (CALL_SEP, LINE_SEP, RETURN_SEP)}
        forced = events.get(prompt[-1])
        self.forced.append(forced)
        frames = self.session.frames if self.session else []
        if forced == CALL_SEP:
            frames = []
        nxt = align(frames, self.real)[-1] + 1 if frames else 0
        if forced == RETURN_SEP and self.real[nxt].event != "return":
            depth = 1
            while depth:
                depth += {"call": 1, "return": -1}.get(self.real[nxt].event, 0)
                nxt += 0 if depth == 0 else 1
        if nxt >= len(self.real):
            return [tok.eos_id]
        ids = tok.encode_parts(frame_parts(self.real[nxt]))
        return ids[1:] if forced else ids


def session_with(tokenizer, truth, call_frame=True):
    oracle = Oracle(tokenizer, truth.frames)
    session = DebugSession(mark_entry(SOURCE, "f"), tokenizer, oracle,
                           truth.frames[0] if call_frame else None)
    oracle.session = session
    return session, oracle


def test_real_trace_runs_in_the_sandbox(truth):
    assert truth.return_repr == "5"
    assert truth.frames[0].event == "call" and truth.frames[0].locals == {"xs": "[1, 2]"}


def test_the_prompt_is_built_from_token_ids(tokenizer, truth):
    session, oracle = session_with(tokenizer, truth)
    expected = tokenizer.encode_parts(trace_parts(mark_entry(SOURCE, "f"), truth.frames[:1],
                                                  complete=False) + [(LINE_SEP, True)])
    assert session._prompt(LINE_SEP) == expected
    session.step()
    assert oracle.forced == [LINE_SEP]   # after the call frame, step forces a line


def test_reset_lets_the_model_predict_the_call_frame(tokenizer, truth):
    session, oracle = session_with(tokenizer, truth, call_frame=False)
    assert oracle.forced == [CALL_SEP] and session.frames == truth.frames[:1]


def test_step_predicts_frames_in_order(tokenizer, truth):
    session, _ = session_with(tokenizer, truth)
    steps = [f for _ in range(len(truth.frames) - 1) for f in session.step()]
    assert steps == truth.frames[1:]
    assert session.step() == [] and session.finished


def test_next_forces_the_callees_return_and_out_returns(tokenizer, truth):
    session, oracle = session_with(tokenizer, truth)
    assert [f.line.strip() for f in session.next()] == ["total = 0"]
    session.next()  # for x in xs
    session.next()  # total += square(x)
    assert session.frames[-1].line.strip() == "total += square(x)"
    stepped = session.next()  # the call to square, its return forced, then back in f
    assert [f.event for f in stepped] == ["call", "return", "line"]
    assert stepped[1].value == "1" and stepped[-1].line.strip() == "for x in xs:"
    assert RETURN_SEP in oracle.forced
    assert session.value("total") == "1"
    session.out()
    assert session.finished or session.frames[-1].event == "return"
    assert [f for f in session.frames if f.event == "return"][-1].value == "5"


def test_malformed_predictions_and_token_spellings(tokenizer, truth):
    session = DebugSession(mark_entry(SOURCE, "f"), tokenizer, lambda prompt: tokenizer.encode(
        "<|line_sep|>{}<|action_sep|>x<|frame_sep|>"), truth.frames[0])
    assert session.step() == [] and "malformed" in session.error   # spelled, not tokens
    session.reset()
    assert session.error is None and len(session.frames) == 1
    forged = truth.frames[1]._replace(locals={"s": "'<|frame_sep|><|arg_sep|>'"})
    assert frame_from_ids(tokenizer, tokenizer.encode_parts(frame_parts(forged))) == forged


def test_interactive_commands_show_model_and_real(tokenizer, truth):
    session, _ = session_with(tokenizer, truth)
    out = io.StringIO()
    interact(session, ["s", "p xs", "n", "b", "o", "bogus"], truth.frames, True, out)
    text = out.getvalue()
    assert "== real: line      total = 0" in text
    assert "xs = [1, 2]" in text
    assert "unknown command 'bogus'" in text
    assert "!=" not in text


TINY = "def f(x):\n    y = x + 1\n    return y\n"


@pytest.mark.slow
def test_the_debugger_drives_cwm_serve(tmp_path):
    """A debug model memorises one trace; ``cwm serve`` serves it; the debugger, through the
    OpenAI-compatible /completions endpoint with token-id prompts, predicts the call frame
    (forced <|call_sep|>) and steps to the return."""
    import torch

    from cwm_exec.trace_format import split_trace
    from cwm_exec.tracer import trace_function
    from cwm_model.checkpoint import save_checkpoint
    from cwm_model.model import CWM
    from cwm_model.presets import get_preset
    from tests.model.conftest import memorise, single_thread

    real = trace_function(TINY, "f", "3")
    context, _ = split_trace(real.text, real.frames)
    tok = train_tokenizer([TINY, real.text], vocab_size=300)
    ids = tok.encode_parts(trace_parts(context, real.frames))
    torch.manual_seed(0)
    model = CWM(get_preset("debug", vocab_size=tok.vocab_size))
    with single_thread():
        assert memorise(model, [ids], steps=400) < 0.05
    save_checkpoint(tmp_path / "ckpt", model, tok)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cwm_model.cli", "serve", str(tmp_path / "ckpt"),
                             "--port", "0", "--model-name", "cwm-debug"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stdout.read()
        base = line.split("listening on ")[1].strip()
        complete = endpoint_completer(base, "cwm-debug", tok, max_new_tokens=60)
        session = DebugSession(mark_entry(TINY, "f"), tok, complete)   # the model's call frame
        assert session.frames == real.frames[:1]
        while not session.finished and len(session.frames) < 10:
            session.step()
        assert session.frames == real.frames and session.error is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
