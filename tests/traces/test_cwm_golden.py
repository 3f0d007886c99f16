"""Golden traces: expected text built by hand from CWM's documented rules, never from our output.

The rules (see ``cwm_exec.trace_format``; github.com/facebookresearch/cwm ``PROMPTING_GUIDE.md``
and ``demos/cwmdbg.py``): prompt ``<|begin_of_text|><|trace_context_start|>CONTEXT<|frame_sep|>``
with the entry's def line marked ``  # << START_OF_TRACE``; frames
``<|call_sep|>LOCALS<|action_sep|>LINE<|frame_sep|>``, ``<|line_sep|>...``,
``<|return_sep|><|action_sep|>LINE<|arg_sep|>VALUE<|frame_sep|>``, ``<|exception_sep|>...``;
LOCALS is ``json.dumps`` (ensure_ascii) of name -> repr, ``".."`` when unchanged in the scope,
everything written again after a scope change; LINE is the source line with its newline, the
call frame's without the marker; a function left by an exception gets its exception frame and
then a return frame with ``None``; ``<|end_of_text|>`` when the entry scope is left.
Each expected string below is assembled from those rules with literal reprs.
"""

from __future__ import annotations

import pytest

from cwm_exec import tracer
from cwm_exec.trace_format import final_value, parse_trace, split_trace, trace_parts
from cwm_exec.tracer import trace_function

B, TCS, FS, AS = "<|begin_of_text|>", "<|trace_context_start|>", "<|frame_sep|>", "<|action_sep|>"
CALL, LINE, RET, EXC, ARG = ("<|call_sep|>", "<|line_sep|>", "<|return_sep|>",
                             "<|exception_sep|>", "<|arg_sep|>")
EOT = "<|end_of_text|>"


def call(locals_json, line):
    return f"{CALL}{locals_json}{AS}{line}\n{FS}"


def step(locals_json, line):
    return f"{LINE}{locals_json}{AS}{line}\n{FS}"


def ret(line, value_json):
    return f"{RET}{AS}{line}\n{ARG}{value_json}{FS}"


def exc(line, value_json):
    return f"{EXC}{AS}{line}\n{ARG}{value_json}{FS}"


def golden(source, def_line, *frames):
    """The whole text: the prompt (``def_line`` marked as the entry), the frames, end of text."""
    context = source.replace(def_line, f"{def_line}  # << START_OF_TRACE")
    return B + TCS + context + FS + "".join(frames) + EOT


@pytest.fixture(params=["c", "python"])
def recorder(request, monkeypatch):
    """Both recorders must write the golden text."""
    if request.param == "c" and not tracer.ACCELERATED:
        pytest.fail("the C recorder is not built: run `.venv/bin/pip install -e . --no-deps "
                    "--no-build-isolation`")
    monkeypatch.setattr(tracer, "ACCELERATED", request.param == "c")
    return request.param


NON_ASCII = '''def f(name):
    greeting = "héllo " + name
    return greeting'''


def test_non_ascii_values_are_json_dumps_escaped(recorder):
    result = trace_function(NON_ASCII, "f", "'wörld ☃'")
    expected = golden(NON_ASCII, "def f(name):",
                      call('{"name": "\'w\\u00f6rld \\u2603\'"}', "def f(name):"),
                      step('{"name": ".."}', '    greeting = "héllo " + name'),
                      step('{"name": "..", "greeting": "\'h\\u00e9llo w\\u00f6rld \\u2603\'"}',
                           "    return greeting"),
                      ret("    return greeting", '"\'h\\u00e9llo w\\u00f6rld \\u2603\'"'))
    assert result.text == expected


NESTED = '''def sq(v):
    return v * v

def f(xs):
    total = 0
    for x in xs:
        total += sq(x)
    return total'''


def test_nested_calls_rewrite_values_after_a_scope_change(recorder):
    result = trace_function(NESTED, "f", "[2, 3]")
    expected = golden(NESTED, "def f(xs):",
                      call('{"xs": "[2, 3]"}', "def f(xs):"),
                      step('{"xs": ".."}', "    total = 0"),
                      step('{"xs": "..", "total": "0"}', "    for x in xs:"),
                      step('{"xs": "..", "total": "..", "x": "2"}', "        total += sq(x)"),
                      call('{"v": "2"}', "def sq(v):"),
                      step('{"v": ".."}', "    return v * v"),
                      ret("    return v * v", '"4"'),
                      step('{"xs": "[2, 3]", "total": "4", "x": "2"}', "    for x in xs:"),
                      step('{"xs": "..", "total": "..", "x": "3"}', "        total += sq(x)"),
                      call('{"v": "3"}', "def sq(v):"),
                      step('{"v": ".."}', "    return v * v"),
                      ret("    return v * v", '"9"'),
                      step('{"xs": "[2, 3]", "total": "13", "x": "3"}', "    for x in xs:"),
                      step('{"xs": "..", "total": "..", "x": ".."}', "    return total"),
                      ret("    return total", '"13"'))
    assert result.text == expected


RAISES = '''def check(n):
    if n < 0:
        raise ValueError("négatif")
    return n

def f(n):
    return check(n)'''


def test_a_function_left_by_an_exception_gets_a_return_frame(recorder):
    result = trace_function(RAISES, "f", "-1")
    err = '"ValueError(\'n\\u00e9gatif\')"'
    expected = golden(RAISES, "def f(n):",
                      call('{"n": "-1"}', "def f(n):"),
                      step('{"n": ".."}', "    return check(n)"),
                      call('{"n": "-1"}', "def check(n):"),
                      step('{"n": ".."}', "    if n < 0:"),
                      step('{"n": ".."}', '        raise ValueError("négatif")'),
                      exc('        raise ValueError("négatif")', err),
                      ret('        raise ValueError("négatif")', '"None"'),
                      exc("    return check(n)", err),
                      ret("    return check(n)", '"None"'))
    assert result.text == expected
    assert final_value(result.frames) == ("exception", "ValueError('négatif')")


GENERATOR = '''def gen(k):
    for i in range(k):
        yield i

def f(k):
    return list(gen(k))'''


def test_generators_return_at_each_yield(recorder):
    """settrace's events: a return at each yield, a call at each resumption. The resumption's
    action is the def line (our choice: CWM's tracer is not public, its debugger never says)."""
    result = trace_function(GENERATOR, "f", "2")
    expected = golden(GENERATOR, "def f(k):",
                      call('{"k": "2"}', "def f(k):"),
                      step('{"k": ".."}', "    return list(gen(k))"),
                      call('{"k": "2"}', "def gen(k):"),
                      step('{"k": ".."}', "    for i in range(k):"),
                      step('{"k": "..", "i": "0"}', "        yield i"),
                      ret("        yield i", '"0"'),
                      call('{"k": "2", "i": "0"}', "def gen(k):"),
                      step('{"k": "..", "i": ".."}', "    for i in range(k):"),
                      step('{"k": "..", "i": "1"}', "        yield i"),
                      ret("        yield i", '"1"'),
                      call('{"k": "2", "i": "1"}', "def gen(k):"),
                      step('{"k": "..", "i": ".."}', "    for i in range(k):"),
                      ret("    for i in range(k):", '"None"'),
                      ret("    return list(gen(k))", '"[0, 1]"'))
    assert result.text == expected


def test_split_trace_recovers_the_context_even_when_values_spell_tokens():
    forged = "<|frame_sep|><|end_of_text|>"
    src = f"def f(s):\n    t = s + {forged!r}\n    return t"
    result = trace_function(src, "f", repr(forged))
    context, complete = split_trace(result.text, result.frames)
    assert complete and context == src.replace("def f(s):", "def f(s):  # << START_OF_TRACE")
    specials = [text for text, special in trace_parts(context, result.frames) if special]
    assert specials.count(FS) == 1 + len(result.frames) and specials[-1] == EOT
    assert "".join(t for t, _ in trace_parts(context, result.frames)) == result.text


def test_parse_of_a_golden_trace_keeps_newlines_and_escapes():
    _, frames = parse_trace(trace_function(NON_ASCII, "f", "'ö'").text)
    assert frames[0].line == "def f(name):\n" and frames[0].locals == {"name": "'ö'"}
