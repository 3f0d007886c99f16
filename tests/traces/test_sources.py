import ast

from cwm_beam import fuzz, synthetic
from cwm_beam.sources import cruxeval_records
from cwm_beam.traces import exception_quota, program_hash, select_fuzzed, split_of


def test_cruxeval_is_bundled():
    records = list(cruxeval_records())
    assert len(records) == 800 and {"code", "input", "output", "id"} <= set(records[0])


def test_synthetic_programs_are_deterministic_and_compile():
    a = list(synthetic.generate(7, 50))
    assert a == list(synthetic.generate(7, 50))
    assert a != list(synthetic.generate(8, 50))
    for program in a:
        compile(program["code"], "<synthetic>", "exec")
        ast.literal_eval(f"({program['input']},)")


def test_split_is_by_program_hash_and_near_the_fraction():
    hashes = [program_hash(p["code"]) for p in synthetic.generate(0, 2000)]
    held_out = sum(split_of(h, 0.1) == "validation" for h in hashes) / len(hashes)
    assert 0.07 < held_out < 0.13
    assert program_hash("def f():\n    return 1  \n") == program_hash("def f():\n    return 1")


def test_fuzz_uses_types_and_literals():
    code = "def f(text: str, n):\n    if text == 'magic':\n        return n + 1\n    return 0"
    inputs = list(fuzz.candidate_inputs(code, None, 30, seed=0))
    assert len(inputs) == len(set(inputs)) == 30
    values = [ast.literal_eval(f"({i},)") for i in inputs]
    typed = sum(isinstance(v[0], str) and isinstance(v[1], int) for v in values)
    assert typed >= 20   # mostly the guessed types; a few others on purpose, for exceptions
    assert any(isinstance(v[0], str) and "mag" in v[0] for v in values)


def test_select_fuzzed_respects_the_exception_quota():
    records = [{"fuzz_index": i, "exception": "E()" if i % 2 else None, "fuzz_of": "p",
                "id": f"p#{i}"} for i in range(8)]
    kept = select_fuzzed("p", records, 4, 0.25)
    assert len(kept) == 4 and sum(r["exception"] is not None for r in kept) == 1
    quotas = [exception_quota(f"p{i}", 3, 0.1) for i in range(2000)]
    assert abs(sum(quotas) / 2000 - 0.3) < 0.05
