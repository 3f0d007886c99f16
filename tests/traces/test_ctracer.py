"""The C recorder (cwm_exec._ctracer) against the Python reference recorder: same frames, same
text, same outcome, on every CRUXEval program, synthetic programs and the corner cases below."""

import json
import sys
from pathlib import Path

import pytest

import cwm_spec
from cwm_exec import tracer
from cwm_exec.sandbox import Limits, run_command
from cwm_exec.tracer import TraceLimits, trace_function

HERE = Path(__file__).resolve().parent


def test_the_c_recorder_is_built_and_used():
    # An install without a C compiler falls back to the Python recorder (2x slower tracing):
    # that must show here, not pass silently.
    assert tracer._ctracer is not None, (
        "cwm_exec._ctracer was not built: install a C compiler and rerun `pip install -e .`")
    assert tracer.ACCELERATED


def both(code, args, limits=TraceLimits(), entry="f"):
    results = []
    for accelerated in (True, False):
        previous, tracer.ACCELERATED = tracer.ACCELERATED, accelerated
        try:
            results.append(trace_function(code, entry, args, limits=limits))
        finally:
            tracer.ACCELERATED = previous
    c, python = (tracer._ADDRESS.sub(" at 0x...", json.dumps(r.to_json())) for r in results)
    assert c == python
    return results[0]


CASES = {
    "generator resumed after a refused step-in": (
        "def g(n):\n    for i in range(n):\n        yield i * 2\n\n"
        "def f(n):\n    t = 0\n    for v in g(n):\n        t += v\n    return t", "6",
        TraceLimits(step_in_probability=0.5, seed=7, max_depth=2)),
    "recursion past the depth limit": (
        "def f(n):\n    if n <= 1:\n        return 1\n    return n * f(n - 1)", "9",
        TraceLimits(max_depth=3)),
    "deleted and rebound locals": (
        "def f(x):\n    try:\n        1 / x\n    except ZeroDivisionError as e:\n        x = 5\n"
        "    del x\n    x = [1]\n    return x", "0", TraceLimits()),
    "long containers mutated in place": (
        "def f(n):\n    xs = list(range(100))\n    d = {i: i for i in range(50)}\n"
        "    for i in range(n):\n        xs[50] = i\n        xs.append(i)\n        d[i] = -i\n"
        "    return len(xs), d[3]", "12", TraceLimits()),
    "short containers, unchanged and changed": (
        "def f(n):\n    a, b, t = [], {}, ()\n    for i in range(n):\n        a.append(i)\n"
        "        b[i] = str(i)\n        t += (i,)\n        c = a\n    return a, b, t", "4",
        TraceLimits()),
    "an int too long for repr and a failing __repr__": (
        "class A:\n    def __repr__(self):\n        raise KeyError('no')\n\n"
        "def f(n):\n    x = 10 ** 5000\n    a = A()\n    return n", "1", TraceLimits()),
    "closures and methods": (
        "class S:\n    def __init__(self):\n        self.items = []\n"
        "    def push(self, x):\n        self.items.append(x)\n        return len(self.items)\n\n"
        "def f(n):\n    k = 1\n    def inner(m):\n        return m + k\n    s = S()\n"
        "    for i in range(n):\n        s.push(inner(i))\n    return s.items", "3", TraceLimits()),
    "exceptions caught in a callee and escaping the entry": (
        "def h(x):\n    raise ValueError('bad ' * 60)\n\ndef g(x):\n    return h(x)\n\n"
        "def f(x):\n    try:\n        g(x)\n    except ValueError:\n        pass\n    return g(x)",
        "1", TraceLimits(max_repr_chars=40)),
    "strings that need JSON escapes": (
        "def f(s):\n    t = s + '\\n\\t\"\\\\' + chr(1) + 'é'\n    return t * 2", "'q'",
        TraceLimits()),
    "the event limit": (
        "def f(x):\n    while True:\n        x += 1", "0", TraceLimits(max_events=50)),
    "the byte limit": (
        "def f(x):\n    for i in range(1000):\n        x += 'ab'\n    return x", "''",
        TraceLimits(max_bytes=3000)),
    "lambdas traced": (
        "def f(xs):\n    return sorted(xs, key=lambda x: -x)", "[3, 1, 2]",
        TraceLimits(trace_lambdas=True)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_recorders_agree_on_corner_cases(name):
    code, args, limits = CASES[name]
    result = both(code, args, limits)
    assert result.frames and result.text.startswith("<|begin_of_text|>")


def test_the_generator_case_completes():
    # The Python recorder used to feed a resumed-but-refused generator's events into its
    # caller's scope and crash the program (IndexError); both now trace it to the end.
    code, args, limits = CASES["generator resumed after a refused step-in"]
    result = both(code, args, limits)
    assert result.exception is None and result.return_repr == "30"


def test_settrace_inside_the_traced_program_stops_both_the_same_way():
    result = both("import sys\n\ndef f(x):\n    y = x + 1\n    sys.settrace(None)\n"
                  "    return y", "1")
    assert result.truncated_reason == "tracing stopped before the entry returned"


@pytest.mark.slow
def test_both_recorders_agree_on_all_of_cruxeval_and_synthetic_programs(tmp_path):
    # CRUXEval is untrusted code: compared inside the sandbox.
    result = run_command(
        [sys.executable, str(HERE / "ctracer_agreement.py"), "--synthetic", "400"],
        cwd=tmp_path, limits=Limits(wall_seconds=600, cpu_seconds=600, memory_mb=4096),
        # cwm_beam.sources (the CRUXEval reader) imports the spec package (operator/).
        binds_ro=[str(HERE), str(Path(cwm_spec.__file__).parent.parent)])
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert report["compared"] == (800 + 400) * 5
    assert report["differences"] == []
