"""Output prediction by trace completion: reading the answer off generated frames."""

from cwm_exec.trace_format import FRAME_SEP, parse_trace
from cwm_exec.tracer import trace_function
from cwm_jobs.evaluate import predicted_return

SOURCE = "def g(v):\n    return v * 2\n\ndef f(xs):\n    out = 0\n    for x in xs:\n" \
         "        out += g(x)\n    return out\n"


def continuation(text: str) -> str:
    head = text.index(FRAME_SEP) + len(FRAME_SEP)
    return text[text.index(FRAME_SEP, head) + len(FRAME_SEP):]


def test_the_true_continuation_yields_the_true_return_value():
    result = trace_function(SOURCE, "f", "[1, 2]")
    _, frames = parse_trace(result.text)
    assert predicted_return(continuation(result.text)) == frames[-1].value == "6"


def test_nested_returns_are_not_mistaken_for_the_entry_return():
    result = trace_function(SOURCE, "f", "[1, 2]")
    rest = continuation(result.text)
    cut = rest.index("<|return_sep|>") + 1  # stop inside the first (nested) return of g
    assert predicted_return(rest[:cut]) is None


def test_malformed_or_unfinished_generation_gives_no_answer():
    assert predicted_return("garbage" + FRAME_SEP) is None
    assert predicted_return("") is None
