"""Inputs for functions that come without any: type-aware generation and mutation (pure).

Each parameter gets a type guess from, in order: its annotation, its default value, how the body
uses it (``x.append`` → list, ``x.upper()`` → str, ``x + 1`` → int, ...), else any of the basic
types. Values are drawn from the literals found in the function (so ``if c == 'q'`` gets tried
with ``'q'``), small random values, and mutations of example inputs when the record has some.
Which candidates are kept is decided after tracing them (``cwm_beam.traces``): those that finish
within the limits, with at most ``exception_share`` of them raising.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Iterator, Sequence
from typing import Any

_STR_METHODS = {"upper", "lower", "strip", "split", "replace", "startswith", "endswith", "find",
                "isdigit", "isalpha", "join", "title", "capitalize", "count", "index", "format",
                "isupper", "islower", "lstrip", "rstrip", "partition", "center", "zfill",
                "isdecimal", "isalnum", "swapcase", "casefold", "ljust", "rjust", "rfind"}
_LIST_METHODS = {"append", "pop", "extend", "insert", "remove", "sort", "reverse", "clear"}
_DICT_METHODS = {"items", "keys", "values", "get", "update", "setdefault", "popitem"}
_TYPES = ("int", "str", "list", "dict", "bool", "float")
_ANNOTATIONS = {"int": "int", "str": "str", "list": "list", "List": "list", "dict": "dict",
                "Dict": "dict", "bool": "bool", "float": "float", "tuple": "list",
                "Sequence": "list", "Iterable": "list", "Mapping": "dict"}


class FuzzError(ValueError):
    """The code has no function to fuzz."""


def find_entry(code: str, entry: str | None = None) -> ast.FunctionDef:
    try:
        tree = ast.parse(code)
    except SyntaxError as err:
        raise FuzzError(f"code does not parse: {err.msg} (line {err.lineno})") from None
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    for node in functions:
        if entry is None or node.name == entry:
            return node
    raise FuzzError(f"no top-level function {entry!r}" if entry else "no top-level function")


def guess_types(fn: ast.FunctionDef) -> list[list[str]]:
    """Candidate types for each positional parameter, most likely first."""
    params = fn.args.posonlyargs + fn.args.args
    defaults = [None] * (len(params) - len(fn.args.defaults)) + list(fn.args.defaults)
    usage = _usage(fn)
    guesses = []
    for param, default in zip(params, defaults):
        found: list[str] = []
        ann = param.annotation
        name = ann.id if isinstance(ann, ast.Name) else (
            ann.value.id if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name)
            else None)
        if name in _ANNOTATIONS:
            found.append(_ANNOTATIONS[name])
        if isinstance(default, ast.Constant) and default.value is not None:
            found.append(type(default.value).__name__)
        found += [t for t in usage.get(param.arg, []) if t not in found]
        guesses.append(found or list(_TYPES[:4]))
    return guesses


def _usage(fn: ast.FunctionDef) -> dict[str, list[str]]:
    hints: dict[str, list[str]] = {}

    def add(name: str, kind: str) -> None:
        hints.setdefault(name, [])
        if kind not in hints[name]:
            hints[name].append(kind)

    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in _STR_METHODS:
                add(node.value.id, "str")
            elif node.attr in _LIST_METHODS:
                add(node.value.id, "list")
            elif node.attr in _DICT_METHODS:
                add(node.value.id, "dict")
        elif isinstance(node, ast.BinOp) and isinstance(node.left, ast.Name) and \
                isinstance(node.right, ast.Constant):
            add(node.left.id, type(node.right.value).__name__)
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and \
                node.comparators and isinstance(node.comparators[0], ast.Constant):
            add(node.left.id, type(node.comparators[0].value).__name__)
        elif isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.iter, ast.Name):
            add(node.iter.id, "list")
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            add(node.value.id, "list")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "range" and node.args and isinstance(node.args[-1], ast.Name):
            add(node.args[-1].id, "int")
    return {k: [t for t in v if t in _TYPES] for k, v in hints.items()}


def literals(fn: ast.FunctionDef) -> dict[str, list[Any]]:
    pool: dict[str, list[Any]] = {"int": [], "str": [], "float": []}
    for node in ast.walk(fn):
        if isinstance(node, ast.Constant) and type(node.value) in (int, str, float) and \
                not isinstance(node.value, bool):
            values = pool[type(node.value).__name__]
            if node.value not in values and len(values) < 32:
                values.append(node.value)
    return pool


def random_value(rng: random.Random, kind: str, pool: dict[str, list[Any]], depth: int = 0):
    if kind == "int":
        if pool["int"] and rng.random() < 0.5:
            return rng.choice(pool["int"]) + rng.choice([-1, 0, 0, 1])
        return rng.randint(-3, 12)
    if kind == "float":
        return round(rng.uniform(-5, 5), 2)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "str":
        base = rng.choice(pool["str"]) if pool["str"] and rng.random() < 0.5 else ""
        alphabet = "abcxyzAB 12-_." + "".join(s for s in pool["str"] if len(s) == 1)
        extra = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        return mutate(rng, base + extra, pool) if base else extra
    if depth > 1:
        return rng.randint(0, 9)
    if kind == "list":
        inner = rng.choice(["int", "int", "str"])
        return [random_value(rng, inner, pool, depth + 1) for _ in range(rng.randint(0, 6))]
    if kind == "dict":
        return {random_value(rng, "str", pool, depth + 1): random_value(rng, "int", pool, depth + 1)
                for _ in range(rng.randint(0, 4))}
    return None


def mutate(rng: random.Random, value: Any, pool: dict[str, list[Any]]) -> Any:
    """One small type-preserving change to ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value, value * 2, 0])
    if isinstance(value, float):
        return value + rng.choice([-1.0, 0.5, 1.0])
    if isinstance(value, str):
        chars = list(value)
        op = rng.randrange(3)
        position = rng.randint(0, len(chars))
        if op == 0 or not chars:
            chars.insert(position, rng.choice("abcxyz0 1_"))
        elif op == 1:
            del chars[min(position, len(chars) - 1)]
        else:
            chars[min(position, len(chars) - 1)] = rng.choice("abcxyzQ9")
        return "".join(chars)
    if isinstance(value, list):
        items = list(value)
        if items and rng.random() < 0.4:
            items.pop(rng.randrange(len(items)))
        elif items and rng.random() < 0.5:
            index = rng.randrange(len(items))
            items[index] = mutate(rng, items[index], pool)
        else:
            items.append(mutate(rng, items[-1], pool) if items else rng.randint(0, 9))
        return items
    if isinstance(value, dict):
        entries = dict(value)
        if entries and rng.random() < 0.5:
            entries.pop(rng.choice(list(entries)))
        else:
            entries[random_value(rng, "str", pool)] = rng.randint(0, 9)
        return entries
    return value


def candidate_inputs(code: str, entry: str | None, count: int, seed: int,
                     examples: Sequence[str] = ()) -> Iterator[str]:
    """``count`` distinct argument strings (CRUXEval ``input`` syntax) for the function."""
    fn = find_entry(code, entry)
    types = guess_types(fn)
    pool = literals(fn)
    rng = random.Random(f"cwm-fuzz/{seed}/{fn.name}/{code}")
    parsed_examples = []
    for example in examples:
        try:
            parsed_examples.append(list(ast.literal_eval(f"({example},)")))
        except (ValueError, SyntaxError):
            continue
    seen: set[str] = set()
    for _ in range(count * 20):
        if len(seen) >= count:
            return
        if parsed_examples and rng.random() < 0.5:
            values = [mutate(rng, v, pool) if rng.random() < 0.7 else v
                      for v in rng.choice(parsed_examples)]
        else:
            values = [random_value(rng, rng.choice(options[:2]) if rng.random() < 0.85
                                   else rng.choice(_TYPES), pool) for options in types]
        text = ", ".join(repr(v) for v in values)
        if text not in seen:
            seen.add(text)
            yield text
