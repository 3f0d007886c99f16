"""The repair helper's evidence reading and each repair, on small source trees: every test
removes something from a working file, gives the failure text pytest prints for it, and checks
that the working file is among the helper's candidates (pure functions: no sandbox, no pytest
run; ``test_policies_repair.py`` runs the policy on real episodes)."""

from __future__ import annotations

import ast
import json
import textwrap

from cwm_forager.repair import (
    Module,
    candidates,
    in_stdlib,
    load_modules,
    main,
    read_before_set,
    read_failure,
    string_transforms,
    to_edit,
)


def module(path: str, source: str) -> Module:
    source = textwrap.dedent(source).lstrip("\n")
    return Module(path, source, ast.parse(source))


def proposed(failure: str, files: dict[str, str], at: list[tuple[str, int]],
             is_stdlib=in_stdlib) -> dict[str, list[str]]:
    """Candidate sources of each path."""
    modules = [module(p, s) for p, s in files.items()]
    out: dict[str, list[str]] = {}
    for _, path, source in candidates(read_failure(failure), modules, at, is_stdlib):
        out.setdefault(path, []).append(source)
    return out


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


PYTEST_OUTPUT = """\
tests/test_x.py:5: in test_a
    assert f(1) == 2
pkg/x.py:3: in f
    return helper(a)
E   NameError: name 'helper' is not defined
E   TypeError: Cache.__init__() got an unexpected keyword argument 'getsizeof'
E   TypeError: scale() takes 2 positional arguments but 3 were given
E   UnboundLocalError: cannot access local variable 'key' where it is not associated with a value
E   AttributeError: 'Point' object has no attribute '_x'
E   assert None == [3, 6]
E   AssertionError: assert 'employee_salary' == 'employee salary'
"""


def test_the_failure_text_is_read_as_evidence():
    failure = read_failure(PYTEST_OUTPUT)
    assert failure.undefined == ["helper"]
    assert failure.keyword == [("Cache.__init__", "getsizeof")]
    assert failure.positional == ["scale"]
    assert failure.unbound == ["key"]
    assert failure.attributes == [("Point", "_x")]
    assert failure.none
    assert failure.strings == [("employee_salary", "employee salary")]
    assert read_failure("E    +  where None = calc.variance([2, 4])\n").none_from == ["variance"]
    assert not read_failure("E   assert 3 == 4\n").none


def test_a_missing_import_of_a_repository_name_is_added_in_the_files_style():
    helpers = "def helper(a):\n    return a + 1\n"
    broken = '''
        """Uses helper."""
        from .other import thing


        def f(a):
            return helper(a) + thing
        '''
    files = {"pkg/__init__.py": "", "pkg/helpers.py": helpers, "pkg/other.py": "thing = 1\n",
             "pkg/x.py": dedent(broken)}
    fixed = dedent(broken).replace("import thing\n", "import thing\nfrom .helpers import helper\n")
    assert fixed in proposed(PYTEST_OUTPUT.split("E   TypeError")[0], files, [("pkg/x.py", 6)])["pkg/x.py"]


def test_a_missing_standard_library_import_is_found_in_the_standard_library_only():
    broken = '''
        def hypot(x, y):
            return math.sqrt(x * x + y * y)


        def product(values):
            return reduce(lambda a, b: a * b, values, 1)
        '''
    files = {"calc/arith.py": dedent(broken)}
    math_fix = proposed("E   NameError: name 'math' is not defined", files, [("calc/arith.py", 2)])
    assert "import math\n" + dedent(broken) in math_fix["calc/arith.py"]
    reduce_fix = proposed("E   NameError: name 'reduce' is not defined", files,
                          [("calc/arith.py", 6)])
    assert "from functools import reduce\n" + dedent(broken) in reduce_fix["calc/arith.py"]
    assert in_stdlib("json") and in_stdlib("math")
    assert not in_stdlib("pytest") and not in_stdlib("cwm_forager")  # installed, not stdlib


def test_a_removed_parameter_is_restored_from_the_type_error():
    working = '''
        def scale(values, factor, offset=0):
            out = []
            for v in values:
                out.append(v * factor + offset)
            return out
        '''
    broken = working.replace(", offset=0", "")
    failure = "E   TypeError: scale() takes 2 positional arguments but 3 were given"
    got = proposed(failure, {"m.py": dedent(broken)}, [])["m.py"]
    assert dedent(working.replace("offset=0", "offset")) in got  # positional, no default


def test_a_removed_keyword_parameter_gets_the_repositorys_usual_default():
    files = {"m.py": dedent('''
        def keymap(func, d):
            rv = factory()
            return rv


        def valmap(func, d, factory=dict):
            return factory()
        ''')}
    failure = "E   TypeError: keymap() got an unexpected keyword argument 'factory'"
    got = proposed(failure, files, [])["m.py"]
    assert any(s.startswith("def keymap(func, d, factory=dict):") for s in got)


def test_a_parameter_the_body_reassigns_is_a_candidate():
    tree = ast.parse("def gcd(b):\n    while b != 0:\n        a, b = b, a % b\n    return abs(a)\n")
    assert read_before_set(tree.body[0]) == ["a"]


def test_a_lost_return_is_put_back_when_the_test_got_none():
    working = "def scale(values, factor):\n    out = [v * factor for v in values]\n    return out\n"
    broken = working.replace("return out", "out")
    got = proposed("E   assert None == [3, 6]", {"m.py": broken}, [("m.py", 3)])["m.py"]
    assert got[0] == working
    # the function the assertion names comes first, wherever the suspicious lines were
    other = "def helper(x):\n    return x\n"
    got = proposed("E   assert None == [3, 6]\nE    +  where None = scale([1, 2], 3)\n",
                   {"m.py": broken + "\n\n" + other}, [("m.py", 6)])["m.py"]
    assert got[0] == working + "\n\n" + other
    call = "def get(d, k):\n    return d.get(k)\n"
    got = proposed("E   AttributeError: 'NoneType' object has no attribute 'x'",
                   {"m.py": call.replace("return ", "")}, [("m.py", 2)])["m.py"]
    assert got[0] == call


def test_a_statement_that_drops_its_value_becomes_a_return_without_none_evidence():
    working = "def clamp(v, lo):\n    if v < lo:\n        return lo\n    return v\n"
    broken = working.replace("return lo", "lo")
    assert working in proposed("E   assert 5 == 0", {"m.py": broken}, [("m.py", 3)])["m.py"]


def test_a_block_left_with_only_pass_gets_a_return_of_its_condition():
    working = dedent('''
        def clamp(value, low, high):
            if value < low:
                return low
            if value > high:
                return high
            return value
        ''')
    broken = working.replace("return low", "pass")
    assert working in proposed("E   assert 5 == 0", {"m.py": broken}, [("m.py", 3)])["m.py"]


CACHES = '''
class TTLCache:
    def expire(self, time=None):
        if time is None:
            time = self.timer()
        root = self.root
        return root

    def __setitem__(self, key, value):
        self.data[key] = value
        self.counter[key] -= 1


class TLRUCache:
    def expire(self, time=None):
        if time is None:
            time = self.timer()
        items = self.items
        return items

    def __setitem__(self, key, value):
        self.data[key] = value
        self.counter[key] -= 1
'''


def test_a_sibling_methods_missing_lines_and_first_lines_are_candidates():
    working = dedent(CACHES)
    lost_line = working.replace("        self.counter[key] -= 1\n", "", 2).replace(
        "        self.data[key] = value\n", "        self.data[key] = value\n"
        "        self.counter[key] -= 1\n", 1)  # the second class's line removed
    assert lost_line.count("counter") == 1
    got = proposed("E   assert 1 == 2", {"c.py": lost_line}, [("c.py", 21)])["c.py"]
    assert working in got
    lost_guard = working.replace(
        "        if time is None:\n            time = self.timer()\n        items", "        items")
    got = proposed("E   assert 1 == 2", {"c.py": lost_guard}, [("c.py", 15)])["c.py"]
    assert working in got


def test_an_emptied_body_is_copied_from_an_analogous_sibling_with_its_names_mapped():
    working = dedent('''
        PLURALS = [("$", "s")]
        SINGULARS = [("s$", "")]


        def pluralize(word):
            """Plural."""
            for rule, replacement in PLURALS:
                if re.search(rule, word):
                    return re.sub(rule, replacement, word)
            return word


        def singularize(word):
            """Singular."""
            for rule, replacement in SINGULARS:
                if re.search(rule, word):
                    return re.sub(rule, replacement, word)
            return word
        ''')
    start = working.index('"""Plural."""\n') + len('"""Plural."""\n')
    end = working.index("\n\n\ndef singularize")
    broken = working[:start] + "    pass" + working[end:]
    got = proposed("E   assert 'x' == 'xs'", {"m.py": "import re\n" + broken}, [("m.py", 7)])
    assert "import re\n" + working in got["m.py"]


def test_an_unbound_name_is_assigned_as_a_sibling_returns_it():
    working = dedent('''
        def hashkey(*args, **kwargs):
            return tuple(args) + tuple(sorted(kwargs.items()))


        def typedkey(*args, **kwargs):
            key = tuple(args) + tuple(sorted(kwargs.items()))
            key += tuple(type(v) for v in args)
            return key
        ''')
    broken = working.replace("    key = tuple(args) + tuple(sorted(kwargs.items()))\n", "")
    failure = "E   UnboundLocalError: cannot access local variable 'key' where it is not associated"
    assert working in proposed(failure, {"k.py": broken}, [("k.py", 6)])["k.py"]


def test_the_failing_comparisons_difference_is_applied_before_the_return():
    # which side is the expected value is unknown: both directions, the written order first
    assert string_transforms([("employee_salary", "employee salary")]) == [
        "s.replace('_', ' ')", "s.replace(' ', '_')"]
    assert "s.capitalize()" in string_transforms([("employee salary", "Employee salary")])
    assert string_transforms([("abc", "xyz")]) == []
    broken = "def humanize(word):\n    word = word.strip()\n    return word\n"
    got = proposed("E   AssertionError: assert 'employee_salary' == 'employee salary'",
                   {"m.py": broken}, [("m.py", 2)])["m.py"]
    assert "    word = word.replace('_', ' ')\n    return word\n" in got[0]


def test_an_unused_init_parameter_sets_the_attribute_the_class_reads():
    working = dedent('''
        class Point:
            def __init__(self, x):
                self._x = x

            def norm(self):
                return abs(self._x)
        ''')
    broken = working.replace("self._x = x", "pass")
    failure = "E   AttributeError: 'Point' object has no attribute '_x'"
    assert working in proposed(failure, {"p.py": broken}, [("p.py", 3)])["p.py"]


def test_edits_are_unique_as_the_edit_tool_matches_them():
    old = "def f():\n    out = []\n    out\n"
    search, replace = to_edit(old, old.replace("    out\n", "    return out\n"))
    assert ("\n" + old).count("\n" + search) == 1 and replace.endswith("return out")


def test_the_command_reads_the_repository_but_not_its_tests(tmp_path, capsys, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "pkg" / "x.py").write_text("def f(a):\n    return helper(a)\n")
    (tmp_path / "tests" / "test_x.py").write_text("def helper(a):\n    return a\n")
    (tmp_path / "failure.txt").write_text("E   NameError: name 'helper' is not defined\n")
    assert [m.path for m in load_modules(tmp_path)] == ["pkg/x.py"]
    monkeypatch.chdir(tmp_path)
    assert main(["failure.txt", "--at", "pkg/x.py:2"]) == 0
    rows = [json.loads(row) for row in capsys.readouterr().out.splitlines()]
    assert rows and all(r["path"] == "pkg/x.py" for r in rows)
    assert not any("import" in r["replace"] for r in rows)  # the tests' helper is not a source
    assert rows[0] == {"repair": "restored parameter 'helper' of 'f' at position 0",
                       "path": "pkg/x.py", "search": "def f(a):", "replace": "def f(helper, a):"}
