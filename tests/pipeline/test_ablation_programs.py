"""The ablation's programs (benchmarks/ablation_programs.py): the stated difficulty, true outputs."""

from __future__ import annotations

import ast
import json

from benchmarks import ablation_programs as programs


def test_programs_have_the_stated_shape_and_their_true_output():
    seen = set()
    for program in programs.generate(seed=0, count=300):
        tree = ast.parse(program["code"])
        (function,) = tree.body
        assert isinstance(function, ast.FunctionDef) and len(function.args.args) == 1
        *assignments, ret = function.body
        assert len(assignments) in programs.STATEMENTS and isinstance(ret, ast.Return)
        assert int(program["input"]) in programs.INPUTS
        namespace: dict = {}
        exec(program["code"], namespace)  # our own generated arithmetic
        assert repr(namespace["f"](ast.literal_eval(program["input"]))) == program["output"]
        seen.add(len(assignments))
    assert seen == set(programs.STATEMENTS)  # both difficulties occur


def test_generation_is_a_pure_function_of_seed_and_index(tmp_path):
    first = programs.write(tmp_path / "a.jsonl", seed=3, count=50).read_text()
    assert first == programs.write(tmp_path / "b.jsonl", seed=3, count=50).read_text()
    assert first != programs.write(tmp_path / "c.jsonl", seed=4, count=50).read_text()
    record = json.loads(first.splitlines()[7])
    assert record == programs.generate_program(3, 7) and set(record) == {
        "id", "code", "input", "output"}
