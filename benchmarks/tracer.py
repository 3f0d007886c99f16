"""Tracer overhead over CRUXEval: traced ÷ untraced time, with references measured in the same run.

    .venv/bin/python benchmarks/tracer.py [--repeats 3] [--limit 800]

Times only the calls (programs compiled and inputs evaluated beforehand, inputs rebuilt for each
call because some functions mutate them), for: the untraced call; ``cwm_exec.tracer.trace_call``
(frames *and* the encoded trace text) with its C recorder (the default) and with its Python
reference recorder; pysnooper writing to /dev/null (the reference the issue names); and a naive
tracer that reprs every local at every line. The five run interleaved, program by program.
CRUXEval is untrusted code like any other, so the measuring process runs inside the sandbox
(``run_command``); ``--inner`` is that process.

Two statistics: ``sum`` adds every call's time; ``min`` adds, per program and variant, the fastest
of the ``--repeats`` calls. On a shared machine one preempted 3 µs untraced call adds milliseconds
to ``sum``'s baseline (it moved 8–20 ms between runs here), so ``min`` is the stable one.
Cyclic garbage collection is off while timing (as ``timeit`` does): otherwise a collection of
one variant's garbage lands in whichever variant allocates next.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def load(limit: int) -> list[dict]:
    from cwm_beam.sources import cruxeval_records

    return list(cruxeval_records())[:limit]


def prepare(records: list[dict], repeats: int):
    """(function, marked source, [(args, kwargs)] per repeat) for each program."""
    from cwm_exec.trace_format import mark_entry
    from cwm_exec.tracer import FILENAME, parse_call_args

    jobs = []
    for record in records:
        namespace: dict = {"__name__": "__bench__"}
        exec(compile(record["code"], FILENAME, "exec"), namespace)
        calls = [parse_call_args(record["input"], namespace) for _ in range(repeats * 5)]
        jobs.append((namespace["f"], mark_entry(record["code"], "f"), calls))
    return jobs


def naive_tracer(sink: list):
    """Repr every local at every line of every frame of the traced file (no change detection)."""
    def local(frame, event, arg):
        sink.append((event, frame.f_lineno, {k: repr(v) for k, v in frame.f_locals.items()}))
        return local

    def on_call(frame, event, arg):
        return local if frame.f_code.co_filename == "<cwm-traced>" else None
    return on_call


def measure(jobs, repeats: int) -> dict[str, float]:
    import pysnooper

    from cwm_exec.tracer import ACCELERATED, TraceLimits, trace_call

    if not ACCELERATED:
        raise SystemExit("cwm_exec._ctracer is not built: reinstall (pip install -e .) with a C "
                         "compiler available")
    limits = TraceLimits()
    names = ("untraced", "cwm_tracer", "cwm_tracer_python", "naive_tracer", "pysnooper")
    totals = dict.fromkeys(names, 0.0)
    best = [dict.fromkeys(names, float("inf")) for _ in jobs]
    snooped = [pysnooper.snoop(output="/dev/null", color=False)(fn) for fn, _, _ in jobs]
    clock = time.perf_counter
    for rep in range(repeats):
        for index, (fn, marked, calls) in enumerate(jobs):
            seconds = {}
            args, kwargs = calls[rep * 5]
            t = clock()
            fn(*args, **kwargs)
            seconds["untraced"] = clock() - t
            args, kwargs = calls[rep * 5 + 1]
            t = clock()
            trace_call(fn, args, kwargs, marked, limits)
            seconds["cwm_tracer"] = clock() - t
            args, kwargs = calls[rep * 5 + 4]
            t = clock()
            trace_call(fn, args, kwargs, marked, limits, accelerated=False)
            seconds["cwm_tracer_python"] = clock() - t
            args, kwargs = calls[rep * 5 + 2]
            sink: list = []
            t = clock()
            sys.settrace(naive_tracer(sink))
            try:
                fn(*args, **kwargs)
            finally:
                sys.settrace(None)
            seconds["naive_tracer"] = clock() - t
            args, kwargs = calls[rep * 5 + 3]
            t = clock()
            snooped[index](*args, **kwargs)
            seconds["pysnooper"] = clock() - t
            for name, value in seconds.items():
                totals[name] += value
                best[index][name] = min(best[index][name], value)
    minima = {name: sum(b[name] for b in best) for name in names}
    return {"sum": totals, "min": minima}


def inner(args) -> None:
    import gc

    records = load(args.limit)
    jobs = prepare(records, args.repeats)
    measure(jobs[:50], 1)  # warm-up
    gc.collect()
    gc.disable()
    stats = measure(jobs, args.repeats)
    gc.enable()
    print(json.dumps({"programs": len(jobs), "repeats": args.repeats,
                      "seconds": {s: {k: round(v, 4) for k, v in t.items()}
                                  for s, t in stats.items()},
                      "ratio_vs_untraced": {s: {k: round(v / t["untraced"], 1)
                                                for k, v in t.items()}
                                            for s, t in stats.items()}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=800)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return
    import cwm_spec
    from cwm_exec.sandbox import Limits, describe_isolation, run_command

    with tempfile.TemporaryDirectory() as work:
        result = run_command(
            [sys.executable, str(Path(__file__).resolve()), "--inner",
             "--repeats", str(args.repeats), "--limit", str(args.limit)],
            cwd=work, limits=Limits(wall_seconds=600, cpu_seconds=600, memory_mb=4096),
            # The CRUXEval reader (cwm_beam.sources) imports the spec package (operator/).
            binds_ro=[str(Path(__file__).resolve().parent),
                      str(Path(cwm_spec.__file__).resolve().parent.parent)])
    if result.returncode != 0:
        sys.exit(f"benchmark failed ({result.reason}): {result.stderr.decode()[-2000:]}")
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    print(f"sandbox: {describe_isolation()}")
    print(f"CRUXEval: {report['programs']} programs x {report['repeats']} calls each")
    print(f"  {'':13s} {'sum (ms)':>10s} {'ratio':>7s}   {'min (ms)':>10s} {'ratio':>7s}")
    for name in report["seconds"]["sum"]:
        ratios = report["ratio_vs_untraced"]
        cells = [f"{report['seconds'][s][name] * 1000:10.1f} {ratios[s][name]:6.1f}x"
                 for s in ("sum", "min")]
        print(f"  {name:13s} {cells[0]}   {cells[1]}")


if __name__ == "__main__":
    main()
