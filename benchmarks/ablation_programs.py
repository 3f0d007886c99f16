"""The ablation's programs: short integer programs of a fixed, stated difficulty, in CRUXEval's
``{"code", "input"}`` format (a ``jsonl`` trace source).

The trace-data ablation (benchmarks/ablation.py, examples/ablation/) asks whether execution traces
in mid-training teach a model to predict what a program returns. The project's general synthetic
generator (cwm_beam.synthetic: 3-6 statements, loops, strings, lists) is far beyond what the
``debug`` model can answer directly after 30 CPU minutes, in either arm, so its held-out
programs could not tell the arms apart. These are simpler, with the difficulty fixed here, before
any training, and stated with the results (docs/benchmarks.md):

* one integer parameter, called with an integer in ``INPUTS``;
* ``STATEMENTS`` assignments (1 or 2, equally likely), each ``new = previous OP operand``, where
  ``previous`` is the variable assigned last (the parameter first), ``OP`` is ``+`` or ``-``
  (operand a literal in ``ADDENDS`` or, with probability ``PARAMETER_OPERAND``, the parameter) or
  ``*`` (operand a literal in ``FACTORS``);
* ``return`` of the last variable; variable names drawn from ``NAMES`` (so the same computation
  appears under different names, and a model must bind names to values).

Generation is a pure function of ``(seed, index)``. Training and held-out programs come from the
same generator; the pipeline splits them by program hash (traces' ``validationFraction``), so a
held-out program's code is never trained on.

    python -m benchmarks.ablation_programs --count 20000 --out runs/ablation-with/programs.jsonl
"""

from __future__ import annotations

import argparse
import json
import operator
import random
from collections.abc import Iterator
from pathlib import Path

INPUTS = range(0, 10)
STATEMENTS = (1, 2)
ADDENDS = range(0, 10)
FACTORS = (2, 3)
PARAMETER_OPERAND = 0.2
NAMES = "abcdkmnpqrtyz"
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
SETTINGS = {"inputs": "0..9", "statements": list(STATEMENTS), "addends": "0..9",
            "factors": list(FACTORS), "parameter_operand": PARAMETER_OPERAND,
            "names": NAMES, "ops": "+ - *"}


def generate_program(seed: int, index: int) -> dict[str, str]:
    """``{"id", "code", "input", "output"}``; ``output`` is the true return value's repr,
    computed here (the trace step computes it again, in the sandbox)."""
    rng = random.Random(f"cwm-ablation/{seed}/{index}")
    names = rng.sample(NAMES, 1 + max(STATEMENTS))
    param, value = names[0], rng.choice(INPUTS)
    lines, env, previous = [f"def f({param}):"], {param: value}, param
    for name in names[1:1 + rng.choice(STATEMENTS)]:
        op = rng.choice(sorted(OPS))
        if op == "*":
            operand: int | str = rng.choice(FACTORS)
        elif rng.random() < PARAMETER_OPERAND:
            operand = param
        else:
            operand = rng.choice(ADDENDS)
        lines.append(f"    {name} = {previous} {op} {operand}")
        env[name] = OPS[op](env[previous], env[operand] if operand == param else operand)
        previous = name
    lines.append(f"    return {previous}")
    return {"id": f"ablation/{seed}-{index}", "code": "\n".join(lines) + "\n",
            "input": repr(value), "output": repr(env[previous])}


def generate(seed: int, count: int) -> Iterator[dict[str, str]]:
    for index in range(count):
        yield generate_program(seed, index)


def write(path: Path, seed: int, count: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for program in generate(seed, count):
            f.write(json.dumps(program) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(write(args.out, args.seed, args.count))


if __name__ == "__main__":
    main()
