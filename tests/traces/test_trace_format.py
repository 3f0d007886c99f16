import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cwm_exec.trace_format import (
    END_OF_TEXT,
    FRAME_SEP,
    START_MARKER,
    Frame,
    TraceFormatError,
    encode_trace,
    mark_entry,
    parse_trace,
    trace_prompt,
)

SOURCE = "def f(x):\n    y = x + 1\n    return y"


def test_mark_entry_marks_the_def_line_only():
    marked = mark_entry("import os\n\ndef g():\n    pass\n\ndef f(x):\n    return x", "f")
    assert marked.splitlines()[5] == f"def f(x):  {START_MARKER}"
    assert marked.count(START_MARKER) == 1


def test_mark_entry_names_a_missing_function():
    with pytest.raises(TraceFormatError, match="'h'"):
        mark_entry(SOURCE, "h")


def test_encode_matches_the_cwm_layout():
    frames = [Frame("call", {"x": "1"}, "def f(x):\n"),
              Frame("line", {"x": ".."}, "    y = x + 1\n"),
              Frame("return", None, "    return y\n", "2")]
    text = encode_trace(mark_entry(SOURCE, "f"), frames)
    assert text.startswith(trace_prompt(mark_entry(SOURCE, "f")))
    assert ('<|call_sep|>{"x": "1"}<|action_sep|>def f(x):\n<|frame_sep|>'
            '<|line_sep|>{"x": ".."}<|action_sep|>    y = x + 1\n<|frame_sep|>'
            '<|return_sep|><|action_sep|>    return y\n<|arg_sep|>"2"<|frame_sep|>'
            + END_OF_TEXT) in text


text_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20).filter(
    lambda s: "<|" not in s)
frames_strategy = st.lists(st.one_of(
    st.builds(Frame, st.sampled_from(["call", "line"]),
              st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True), text_values,
                              max_size=4),
              text_values.filter(lambda s: "\n" not in s), st.none()),
    st.builds(Frame, st.sampled_from(["return", "exception"]), st.none(),
              text_values.filter(lambda s: "\n" not in s), text_values)), max_size=8)


# No per-example deadline: it is a timing assertion, and on a loaded 2-core machine it failed.
@settings(deadline=None)
@given(frames_strategy)
def test_parse_inverts_encode(frames):
    source = mark_entry(SOURCE, "f")
    assert parse_trace(encode_trace(source, frames)) == (source, frames)


def test_parse_reports_where_a_trace_breaks():
    bad = trace_prompt(SOURCE) + "<|line_sep|>{not json}<|action_sep|>x" + FRAME_SEP
    with pytest.raises(TraceFormatError, match="frame 0: locals are not JSON"):
        parse_trace(bad)
