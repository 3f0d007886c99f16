"""The five mutation families on source text (pure, no sandbox)."""

from __future__ import annotations

import ast

import pytest

from cwm_forager.mutations import (
    FAMILIES,
    apply_edits,
    find_mutations,
    function_lines,
    line_candidates,
    unified_diff,
)
from cwm_forager.repos import FIXTURE_ROOT

SOURCE = '''\
import math
from os import path, sep


def area(radius, scale=1):
    """Circle area."""
    factor = math.pi * scale
    return factor * radius ** 2


def join(a, b):
    if a and not b:
        return a
    return path.join(a, b) + sep


class Counter:
    def bump(self, step, limit):
        total = self.value + step
        if total > limit:
            total = limit
        self.value = total
        return self.value
'''


def mutated(m):
    return apply_edits(SOURCE, m.edits)


def by_family(family):
    return find_mutations(SOURCE, "geo.py", [family])


def test_every_family_finds_mutations_and_they_compile_and_differ():
    for family in FAMILIES:
        found = by_family(family)
        assert found, family
        for m in found:
            new = mutated(m)
            assert ast.dump(ast.parse(new)) != ast.dump(ast.parse(SOURCE))
            assert m.family == family


def test_operator_replacement_changes_only_the_operator():
    texts = {m.description: mutated(m) for m in by_family("operator_replacement")}
    assert "    return factor * radius // 2\n" not in "".join(texts.values())  # '**' -> '*' only
    assert "    return factor * radius * 2\n" in texts["replaced '**' with '*'"]
    assert "if total >= limit:" in texts["replaced '>' with '>='"]
    assert "if a or not b:" in texts["replaced 'and' with 'or'"]
    assert "if a and b:" in texts["removed unary 'not'"]


def test_variable_swap_swaps_two_locals_of_one_statement():
    swaps = [(m.description, mutated(m)) for m in by_family("variable_swap")]
    assert any("    return path.join(b, a) + sep\n" in text for _, text in swaps)
    assert any("if b and not a:" in text for _, text in swaps)
    # globals and modules are never swapped
    assert not any("'math'" in d or "'path'" in d for d, _ in swaps)


def test_parameter_removal_and_argument_reordering():
    found = {m.description: mutated(m) for m in by_family("parameter_removal")}
    assert "def area(radius):" in found["removed parameter 'scale'"]
    assert "def bump(self, limit):" in found["removed parameter 'step'"]
    assert not any("'self'" in d for d in found)  # a method keeps its receiver
    assert "path.join(b, a)" in found["reordered call arguments 'a' and 'b'"]


def test_import_and_return_removal():
    found = {(m.function, m.description): mutated(m) for m in by_family("import_return_removal")}
    assert "\n    factor * radius ** 2\n" in found[("area", "removed 'return'")]
    assert "\n        self.value\n" in found[("Counter.bump", "removed 'return'")]
    found = {d: text for (_, d), text in found.items()}
    assert "from os import sep\n" in found["removed import of 'path' (line 2)"]
    assert "pass\nfrom os" in found["removed import of 'math' (line 1)"]


def test_body_removal_keeps_the_docstring():
    found = [m for m in by_family("body_removal") if m.function == "area"]
    whole = next(mutated(m) for m in found if m.description.startswith("removed the body"))
    assert '"""Circle area."""\n    pass\n' in whole
    one = next(mutated(m) for m in found if m.description == "removed statement at line 7")
    assert "factor = math.pi" not in one and "return factor * radius ** 2" in one


def test_restricting_to_functions():
    only = find_mutations(SOURCE, "geo.py", FAMILIES, functions={"Counter.bump"})
    assert only and {m.function for m in only} == {"Counter.bump"}


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown.*bogus"):
        find_mutations(SOURCE, "geo.py", ["bogus"])


def test_function_lines_and_diff():
    assert function_lines(SOURCE)["Counter.bump"] == (18, 23)
    m = by_family("operator_replacement")[0]
    diff = unified_diff(mutated(m), SOURCE, "geo.py")
    assert diff.startswith("--- a/geo.py\n+++ b/geo.py\n") and diff.count("\n-") == 1


@pytest.mark.parametrize("relpath", ["calc/calc/arith.py", "calc/calc/stats.py",
                                     "textkit/textkit/words.py"])
def test_inverse_operators_undo_every_operator_and_swap_mutation(relpath):
    """The repair candidates for the mutated line always include the original code: the
    search policy can, in principle, fix every operator-replacement and variable-swap bug."""
    source = (FIXTURE_ROOT / relpath).read_text()
    mutations = find_mutations(source, relpath, ["operator_replacement", "variable_swap"])
    assert len(mutations) > 10
    for m in mutations:
        bug = apply_edits(source, m.edits)
        repairs = [new for _, new in line_candidates(bug, m.line)]
        assert source in repairs, (m.description, m.line)
