"""The tracer in this process, on trusted snippets written here (untrusted code goes through
the sandbox: see test_sandbox.py)."""

from cwm_exec.trace_format import parse_trace
from cwm_exec.tracer import TRUNCATION_MARKER, TraceLimits, capped_repr, trace_function


def events(result):
    return [f.event for f in result.frames]


def test_line_frames_show_state_before_the_line_and_unchanged_values():
    r = trace_function("def f(x):\n    y = x * 2\n    y += 1\n    return y", "f", "3")
    assert events(r) == ["call", "line", "line", "line", "return"]
    assert r.frames[0].locals == {"x": "3"}
    assert r.frames[2].locals == {"x": "..", "y": "6"}
    assert r.frames[3].locals == {"x": "..", "y": "7"}
    assert r.frames[-1].value == "7" and r.return_repr == "7"
    assert r.text.endswith("<|end_of_text|>")
    assert parse_trace(r.text)[1] == r.frames


def test_mutation_in_place_is_seen():
    r = trace_function("def f(xs):\n    xs.append(1)\n    return xs", "f", "[]")
    assert r.frames[2].locals == {"xs": "[1]"}


def test_callee_scopes_are_entered_and_caller_values_rewritten_in_full():
    src = "def g(a):\n    return a + 1\n\ndef f(x):\n    y = g(x)\n    return y"
    r = trace_function(src, "f", "1")
    assert events(r) == ["call", "line", "call", "line", "return", "line", "return"]
    assert r.frames[5].locals == {"x": "1", "y": "2"}   # full values after leaving a scope
    shallow = trace_function(src, "f", "1", limits=TraceLimits(max_depth=0))
    assert events(shallow) == ["call", "line", "line", "return"]


def test_random_step_in_is_seeded():
    src = "def g(a):\n    return a\n\ndef f(n):\n    for i in range(n):\n        g(i)\n    return n"
    limits = TraceLimits(step_in_probability=0.5, seed=3)
    a = trace_function(src, "f", "20", limits=limits)
    b = trace_function(src, "f", "20", limits=limits)
    calls = events(a).count("call") - 1
    assert a.frames == b.frames and 0 < calls < 20


def test_exception_caught_and_propagated():
    caught = trace_function("def f(x):\n    try:\n        1 / x\n    except ZeroDivisionError:\n"
                            "        return -1", "f", "0")
    assert "exception" in events(caught) and caught.return_repr == "-1"
    raised = trace_function("def f(x):\n    return 1 / x", "f", "0")
    # An exception leaving a function is followed by its return frame (value None), as
    # sys.settrace reports it and CWM's debugger expects (see trace_format).
    assert events(raised)[-2:] == ["exception", "return"]
    assert raised.frames[-1].value == "None" and raised.exception_type == "ZeroDivisionError"
    assert raised.text.endswith("<|end_of_text|>")


def test_event_and_byte_limits_stop_the_program_with_a_reason():
    loop = trace_function("def f(x):\n    while True:\n        x += 1", "f", "0",
                          limits=TraceLimits(max_events=50))
    assert loop.truncated_reason == "max_events (50)" and loop.events == 50
    assert not loop.text.endswith("<|end_of_text|>")
    big = trace_function("def f(x):\n    for i in range(1000):\n        x += 'ab'\n    return x",
                         "f", "''", limits=TraceLimits(max_bytes=5000))
    assert big.truncated_reason == "max_bytes (5000)"


def test_repr_cap_is_visible_and_cheap_for_long_containers():
    assert capped_repr(list(range(1000)), 20) == repr(list(range(1000)))[:20] + TRUNCATION_MARKER
    assert capped_repr("x" * 50, 10) == repr("x" * 50)[:10] + TRUNCATION_MARKER
    assert capped_repr({i: i for i in range(100)}, 12).startswith("{0: 0, 1: 1,")
    r = trace_function("def f(s):\n    return s", "f", "'a' * 500",
                       limits=TraceLimits(max_repr_chars=16))
    assert r.frames[0].locals["s"].endswith(TRUNCATION_MARKER)
    assert r.return_repr == repr("a" * 500)   # the entry's answer is kept whole


def test_comprehensions_are_not_separate_scopes():
    r = trace_function("def f(xs):\n    ys = [x * 2 for x in xs]\n    return ys", "f", "[1, 2]")
    assert events(r) == ["call", "line", "line", "return"]


def test_a_name_rebound_from_a_long_list_to_a_set_is_tracked():
    # The list's prefix snapshot must not be compared with the set that replaces it.
    r = trace_function("def f(n):\n    x = list(range(n))\n    x = {1, 2}\n    x.add(3)\n"
                       "    return len(x)", "f", "20")
    assert r.return_repr == "3" and r.truncated_reason is None
    assert [f.locals["x"] for f in r.frames if f.locals and "x" in f.locals][-2:] == [
        "{1, 2}", "{1, 2, 3}"]
