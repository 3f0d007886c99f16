"""Trace programs with both recorders (C and the Python reference) and report where they differ.

Run by tests/traces/test_ctracer.py inside the sandbox, because CRUXEval is untrusted code:

    python ctracer_agreement.py --synthetic 400

Prints one JSON line: how many traces were compared and the first differences.
"""

from __future__ import annotations

import argparse
import json

from cwm_beam import synthetic
from cwm_beam.sources import cruxeval_records
from cwm_exec import tracer
from cwm_exec.tracer import ProgramError, TraceLimits, trace_function

SETTINGS = (
    TraceLimits(),
    TraceLimits(max_events=20),
    TraceLimits(max_bytes=1500, max_repr_chars=30),
    TraceLimits(step_in_probability=0.5, seed=7, max_depth=2),
    TraceLimits(trace_lambdas=True, max_repr_chars=12),
)


def outcome(code: str, entry: str, args: str, limits: TraceLimits, accelerated: bool):
    tracer.ACCELERATED = accelerated
    try:
        result = trace_function(code, entry, args, limits=limits)
    except ProgramError as err:
        return {"program_error": str(err)}
    # Object addresses in reprs differ between two runs of the same program.
    return json.loads(tracer._ADDRESS.sub(" at 0x...", json.dumps(result.to_json())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--synthetic", type=int, default=400)
    args = parser.parse_args()
    programs = [(r["code"], "f", r["input"]) for r in cruxeval_records()]
    programs += [(p["code"], p["entry"], p["input"])
                 for p in synthetic.generate(0, args.synthetic)]
    compared, differences = 0, []
    for code, entry, call in programs:
        for limits in SETTINGS:
            a = outcome(code, entry, call, limits, accelerated=True)
            b = outcome(code, entry, call, limits, accelerated=False)
            compared += 1
            if a != b and len(differences) < 3:
                differences.append({"code": code, "input": call, "limits": limits.to_json(),
                                    "c": str(a)[-800:], "python": str(b)[-800:]})
    print(json.dumps({"compared": compared, "differences": differences}))


if __name__ == "__main__":
    main()
