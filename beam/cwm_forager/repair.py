"""Evidence-driven repair candidates, as a command the agent runs in its sandbox.

The search policy's inverse mutation operators cannot bring back what was *removed*: an import,
a parameter, a ``return``, a statement or a whole body. This module proposes such repairs from
what an engineer would look at, and from nothing else:

- the failing run's output (pytest ``--tb=short``): ``NameError`` names the missing import or
  parameter, ``TypeError`` about arguments names the function that lost a parameter, an
  assertion on ``None`` (or ``'NoneType' object``) points at a lost ``return``,
  ``UnboundLocalError`` at a lost assignment, ``AttributeError`` at a lost ``self.x = ...``;
- the repository's own source files (never the tests' expected values, never an installed copy
  of the project): where a name is defined or imported elsewhere, the standard library (modules
  whose file lies in the interpreter's stdlib folder), call sites of the same names, sibling
  functions with the same name and parameters, a block left holding only ``pass``, parameters
  the body never reads, attributes a class reads but never sets.

Usage, inside the repository (the policy saves the failing run's output first)::

    python -m cwm_forager.repair .cwm/failure.txt --at pkg/mod.py:42 --at pkg/mod.py:60

Prints one candidate per line as JSON ``{"repair", "path", "search", "replace"}``: one
SEARCH/REPLACE edit, as the ``edit`` tool takes it, unique in the file. Pure functions below
(:func:`read_failure`, :func:`candidates`), file reading at the edge (:func:`main`).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import difflib
import importlib.util
import json
import re
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cwm_forager.mutations import body_without_docstring, iter_functions, local_names, own_nodes

_NAME_ERROR = re.compile(r"NameError: name '(\w+)' is not defined")
_UNBOUND = re.compile(r"(?:cannot access local variable|local variable) '(\w+)'")
_UNEXPECTED = re.compile(r"TypeError: ([\w.<>]+)\(\) got an unexpected keyword argument '(\w+)'")
_POSITIONAL = re.compile(r"TypeError: ([\w.<>]+)\(\) takes (?:from \d+ to )?\d+ positional "
                         r"arguments? but \d+ (?:were|was) given")
_NONE = re.compile(r"^E\s+.*(?:assert None\b|\bNone (?:==|!=|in)\b|'NoneType' object|where None = )",
                   re.M)
_STRINGS = re.compile(r"^E\s+(?:AssertionError: )?assert ('[^'\n]*'|\"[^\"\n]*\") == "
                      r"('[^'\n]*'|\"[^\"\n]*\")\s*$", re.M)
STRING_METHODS = ("capitalize", "lower", "upper", "title", "strip", "swapcase")
_NONE_FROM = re.compile(r"^E\s+\+\s+where None = ([\w.]+)\(", re.M)
_ATTRIBUTE = re.compile(r"AttributeError: '(\w+)' object has no attribute '(\w+)'")
# Standard-library modules searched for a missing name (``from M import name``), most used first.
STDLIB_MODULES = (
    "functools", "itertools", "collections", "operator", "typing", "os", "re", "math", "sys",
    "inspect", "types", "warnings", "contextlib", "copy", "heapq", "bisect", "random", "string",
    "time", "datetime", "json", "io", "numbers", "abc", "weakref", "enum", "dataclasses",
    "textwrap", "threading", "pathlib", "decimal", "fractions", "statistics", "unicodedata",
    "keyword", "collections.abc", "os.path", "pickle", "struct", "hashlib", "shutil", "logging",
    "pprint", "reprlib", "array", "errno", "glob", "fnmatch", "numbers", "queue")
BUILTINS = frozenset(dir(builtins)) | {"__file__", "__name__", "__doc__", "__class__"}
MAX_CANDIDATES = 8


@dataclass
class Failure:
    """What the failing run's output says (see the module docstring)."""

    undefined: list[str] = field(default_factory=list)     # NameError
    unbound: list[str] = field(default_factory=list)       # UnboundLocalError
    keyword: list[tuple[str, str]] = field(default_factory=list)   # (function, keyword)
    positional: list[str] = field(default_factory=list)    # function given too many arguments
    none: bool = False                                      # None where a value was expected
    attributes: list[tuple[str, str]] = field(default_factory=list)  # (class, attribute)
    strings: list[tuple[str, str]] = field(default_factory=list)  # assert 'left' == 'right'
    none_from: list[str] = field(default_factory=list)  # functions that returned that None


def read_failure(output: str) -> Failure:
    """The evidence in a pytest run's output, each item once, in the order it appears."""
    def once(items: list) -> list:
        return list(dict.fromkeys(items))

    attributes = once(_ATTRIBUTE.findall(output))
    return Failure(
        undefined=once(_NAME_ERROR.findall(output)), unbound=once(_UNBOUND.findall(output)),
        keyword=once(_UNEXPECTED.findall(output)), positional=once(_POSITIONAL.findall(output)),
        none=bool(_NONE.search(output)) or any(c == "NoneType" for c, _ in attributes),
        attributes=[a for a in attributes if a[0] != "NoneType"],
        none_from=once([name.rpartition(".")[2] for name in _NONE_FROM.findall(output)]),
        strings=once([(ast.literal_eval(a), ast.literal_eval(b))
                      for a, b in _STRINGS.findall(output)]))


# ------------------------------------------------------------------------------ the repository


@dataclass
class Module:
    path: str
    source: str
    tree: ast.Module

    @property
    def lines(self) -> list[str]:
        return self.source.splitlines()

    def module_name(self) -> str:
        parts = list(Path(self.path).with_suffix("").parts)
        if parts and parts[0] == "src":
            parts = parts[1:]
        if parts and parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join(parts)

    def package(self) -> str:
        name = self.module_name()
        return name if self.path.endswith("__init__.py") else name.rpartition(".")[0]

    def bound_names(self) -> set[str]:
        """Names bound at module level (definitions, assignments, imports)."""
        names: set[str] = set()
        stack: list[ast.AST] = list(self.tree.body)
        while stack:  # module-level statements, into if/try/with blocks, not into bodies
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {a.asname or a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            stack.extend(ast.iter_child_nodes(node))
        return names


def free_names(func: ast.FunctionDef | ast.AsyncFunctionDef, module: Module) -> list[str]:
    """Names the function reads that nothing binds: not local, not module level, not builtin,
    in the order they are first read."""
    bound = local_names(func) | module.bound_names() | BUILTINS
    reads = sorted((n for n in own_nodes(func) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Load) and n.id not in bound),
                   key=lambda n: (n.lineno, n.col_offset))
    return list(dict.fromkeys(n.id for n in reads))


def read_before_set(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Local names the body reads no later than the line that first sets them (``a, b = b,
    a % b`` reads ``a`` before setting it): a lost parameter the body reassigns."""
    params = set(_params(func))
    stores: dict[str, int] = {}
    loads: dict[str, int] = {}
    for n in own_nodes(func):
        if isinstance(n, ast.Name):
            table = stores if isinstance(n.ctx, ast.Store) else loads
            table[n.id] = min(table.get(n.id, 10**9), n.lineno)
    return [name for name, line in sorted(loads.items(), key=lambda kv: kv[1])
            if name in stores and name not in params and line <= stores[name]]


def _insert_after(lines: list[str], line: int, text: str) -> str:
    """The file with ``text`` (one or more whole lines) inserted after 1-based ``line``."""
    return "\n".join([*lines[:line], text, *lines[line:]]) + "\n"


def _replace_lines(lines: list[str], first: int, last: int, text: str) -> str:
    return "\n".join([*lines[: first - 1], *text.split("\n"), *lines[last:]]) + "\n"


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def to_edit(old: str, new: str) -> tuple[str, str] | None:
    """The smallest whole-line SEARCH/REPLACE taking ``old`` to ``new`` whose SEARCH occurs once
    in ``old`` (context lines added until it does), or None."""
    a, b = old.splitlines(), new.splitlines()
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    tail = 0
    while tail < min(len(a), len(b)) - first and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    for context in range(0, 12):
        lo, hi_a, hi_b = max(0, first - context), len(a) - tail + context, len(b) - tail + context
        if hi_a <= lo:  # a pure insertion: anchor on a neighbouring line
            hi_a, hi_b = lo + 1 + context, lo + len(b) - len(a) + 1 + context
        search = "\n".join(a[lo:hi_a])
        # the edit tool matches SEARCH at a line start, not to a line end: unique as a prefix
        if search and len(re.findall(f"(?={re.escape(chr(10) + search)})", "\n" + old)) == 1:
            return search, "\n".join(b[lo:hi_b])
    return None


# ------------------------------------------------------------------------------ the repairs


def _import_lines(name: str, target: Module, modules: list[Module], is_stdlib) -> Iterator[str]:
    """Import statements that would bind ``name`` in ``target``: copied from the repository's
    other files, from where the repository defines it, or from the standard library."""
    relative = any(isinstance(n, ast.ImportFrom) and n.level for n in target.tree.body)

    def from_import(module: str, alias: str) -> str:
        package = target.package()
        if relative and package and (module == package or module.startswith(package + ".")):
            return f"from .{module[len(package) + 1:]} import {alias}" if module != package \
                else f"from . import {alias}"
        return f"from {module} import {alias}"

    near = sorted(modules, key=lambda m: (m.package() != target.package(), m.path))
    for module in near:  # the repository defines it
        if module.path != target.path and name in _defined(module):
            yield from_import(module.module_name(), name)
        if Path(module.path).stem == name and module.package() and module.path != target.path:
            yield from_import(module.package(), name)
    for module in modules:  # another file imports it
        if module.path == target.path:
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if (a.asname or a.name.split(".")[0]) == name:
                        yield f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if (a.asname or a.name) == name:
                        source = _absolute(module, node)
                        alias = a.name + (f" as {a.asname}" if a.asname else "")
                        if source and source != target.module_name():
                            yield from_import(source, alias)
    if is_stdlib(name):
        yield f"import {name}"
    for stdlib_module in STDLIB_MODULES:
        if is_stdlib(stdlib_module) and _has_attribute(stdlib_module, name):
            yield f"from {stdlib_module} import {name}"


def _absolute(module: Module, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    parts = module.package().split(".") if module.package() else []
    if node.level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])]) or None


def _defined(module: Module) -> set[str]:
    out = set()
    for node in module.tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return out


def _has_attribute(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 (a module that cannot import here offers nothing)
        return False


def import_repairs(name: str, target: Module, modules: list[Module], is_stdlib
                   ) -> Iterator[tuple[str, str]]:
    """(description, new source): ``target`` with an import of ``name`` added after its last
    top-level import (after the docstring and ``__future__`` imports when it has none)."""
    body = target.tree.body
    imports = [n for n in body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if imports:
        after = imports[-1].end_lineno or imports[-1].lineno
    else:
        doc = body[:1] if body and isinstance(body[0], ast.Expr) \
            and isinstance(body[0].value, ast.Constant) else []
        after = (doc[0].end_lineno or 0) if doc else 0
    for line in dict.fromkeys(_import_lines(name, target, modules, is_stdlib)):
        yield f"added '{line}'", _insert_after(target.lines, after, line)


def _functions(modules: list[Module]) -> Iterator[tuple[Module, str, ast.FunctionDef]]:
    for module in modules:
        for qualname, func in iter_functions(module.tree):
            yield module, qualname, func  # type: ignore[misc]


def _common_default(name: str, modules: list[Module]) -> str | None:
    """The default the repository most often gives a parameter called ``name``."""
    seen: Counter[str] = Counter()
    for _, _, func in _functions(modules):
        args = func.args.args + func.args.kwonlyargs
        defaults = [None] * (len(func.args.args) - len(func.args.defaults)) \
            + list(func.args.defaults) + list(func.args.kw_defaults)
        for arg, default in zip(args, defaults):
            if arg.arg == name and default is not None:
                seen[ast.unparse(default)] += 1
    return seen.most_common(1)[0][0] if seen else None


def parameter_repairs(module: Module, func: ast.FunctionDef, name: str, needs_default: bool,
                      modules: list[Module], keyword: bool = False) -> Iterator[tuple[str, str]]:
    """(description, new source): ``func`` with a parameter ``name`` put back, at the position
    the order of first reads suggests first (parameters tend to be read in the order they are
    declared), with the repository's usual default for that name (else ``None``) where one is
    needed."""
    args = func.args.args
    first = 1 if args and args[0].arg in ("self", "cls") else 0
    reads: dict[str, tuple[int, int]] = {}
    for n in sorted((n for n in own_nodes(func) if isinstance(n, ast.Name)),
                    key=lambda n: (n.lineno, n.col_offset)):
        reads.setdefault(n.id, (n.lineno, n.col_offset))
    mine = reads.get(name, (10**9, 0))
    estimate = first + sum(1 for a in args[first:] if reads.get(a.arg, (10**9, 0)) < mine)
    n_plain = len(args) - len(func.args.defaults)
    defaults = list(dict.fromkeys([_common_default(name, modules) or "None", "None", "0", "1"]))
    positions = list(dict.fromkeys([estimate, first, len(args), *sorted(
        range(first, len(args) + 1), key=lambda i: abs(i - estimate))]))
    positional: list[tuple[int, str | None]] = [(i, None) for i in positions if i <= n_plain]
    positional = positional[:3]
    defaulted: list[tuple[int, str | None]] = [
        (max(estimate, n_plain), d) for d in (defaults if needs_default else defaults[:1])]
    defaulted += [(i, defaults[0]) for i in positions if i >= n_plain][:2]
    # passed by keyword: callers may omit it, a default is likely (the last position too)
    # omitted by a caller (NameError): a default at the likely place or at the end next
    end: list[tuple[int, str | None]] = [(len(args), defaults[0])]
    if keyword:
        tries = defaulted[:1] + end + positional + defaulted[1:]
    elif needs_default:
        tries = positional[:1] + defaulted[:1] + end + positional[1:] + defaulted[1:]
    else:
        tries = positional + defaulted
    for i, default in dict.fromkeys(tries):
        text = name if default is None else f"{name}={default}"
        yield (f"restored parameter {text!r} of {func.name!r} at position {i}",
               _with_parameter(module, func, i, text))


def _with_parameter(module: Module, func: ast.FunctionDef, index: int, text: str) -> str:
    """The source with ``text`` inserted as positional parameter ``index`` of ``func``."""
    lines = module.lines
    args = func.args.args
    if index < len(args):
        anchor = args[index]
        line, col = anchor.lineno, anchor.col_offset
        row = lines[line - 1]
        new_row = row[:col] + text + ", " + row[col:]
    elif args:
        anchor = args[-1]
        defaults = [None] * (len(args) - len(func.args.defaults)) + list(func.args.defaults)
        end = defaults[-1] or anchor
        line, col = end.end_lineno, end.end_col_offset  # type: ignore[assignment]
        row = lines[line - 1]
        new_row = row[:col] + ", " + text + row[col:]
    else:
        line = func.lineno
        row = lines[line - 1]
        col = row.index("(", row.index("def ")) + 1
        rest = row[col:].lstrip()
        new_row = row[:col] + text + ("" if rest.startswith(")") else ", ") + row[col:]
    return _replace_lines(lines, line, line, new_row)


def return_repairs(module: Module, func: ast.FunctionDef) -> Iterator[tuple[str, str]]:
    """(description, new source): an expression statement of ``func`` made its ``return``; the
    last statement of the body first."""
    docstring = func.body[0] if body_without_docstring(func.body) is not func.body else None
    statements = [n for n in own_nodes(func) if isinstance(n, ast.Expr) and n is not docstring
                  and not isinstance(n.value, (ast.Yield, ast.YieldFrom, ast.Await))]
    last = body_without_docstring(func.body)[-1:] if func.body else []
    statements.sort(key=lambda n: (n not in last, -n.lineno))
    for node in statements[:3]:
        row = module.lines[node.lineno - 1]
        col = node.col_offset
        new_row = row[:col] + "return " + row[col:]
        yield (f"made line {node.lineno} of {func.name!r} its return",
               _replace_lines(module.lines, node.lineno, node.lineno, new_row))


def no_effect_repairs(module: Module, func: ast.FunctionDef) -> Iterator[tuple[str, str]]:
    """(description, new source): a statement that computes a value and drops it (a name, a
    constant, arithmetic: no call) is most likely a ``return`` that lost its keyword."""
    docstring = func.body[0] if body_without_docstring(func.body) is not func.body else None
    imported = {a.asname or a.name.split(".")[0] for n in module.tree.body
                if isinstance(n, ast.Import) for a in n.names}
    for node in own_nodes(func):
        if isinstance(node, ast.Expr) and node is not docstring and not any(
                isinstance(n, (ast.Yield, ast.YieldFrom, ast.Await, ast.NamedExpr))
                or isinstance(n, ast.Call) and not _pure_call(n, imported)
                for n in ast.walk(node.value)):
            row = module.lines[node.lineno - 1]
            new_row = row[: node.col_offset] + "return " + row[node.col_offset:]
            yield (f"line {node.lineno} computes a value and drops it: made it a return",
                   _replace_lines(module.lines, node.lineno, node.lineno, new_row))


PURE_BUILTINS = frozenset({"abs", "all", "any", "bool", "dict", "divmod", "float", "frozenset",
                           "int", "isinstance", "len", "list", "max", "min", "repr", "round",
                           "set", "sorted", "str", "sum", "tuple", "type", "zip"})


def _pure_call(call: ast.Call, imported: set[str]) -> bool:
    """A call made for its value: a builtin such as ``len``, or a function of an imported
    module (``re.sub``), whose value a statement should not drop."""
    f = call.func
    if isinstance(f, ast.Name):
        return f.id in PURE_BUILTINS
    return isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in imported


def _blocks_with_pass(func: ast.FunctionDef) -> Iterator[tuple[ast.AST, ast.Pass]]:
    for node in [func, *own_nodes(func)]:
        if isinstance(node, ast.ClassDef) or node is not func and isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block:
                rest = body_without_docstring(block) if node is func else block
                if len(rest) == 1 and isinstance(rest[0], ast.Pass):
                    yield node, rest[0]


def pass_block_repairs(module: Module, func: ast.FunctionDef) -> Iterator[tuple[str, str]]:
    """(description, new source): a block left holding only ``pass`` (what removing its only
    statement leaves; ``except`` blocks are left alone, ``pass`` is idiomatic there) given a
    statement of the same function: one of its returns or raises, or ``continue``/``break`` in a
    loop."""
    ends = [ast.unparse(n) for n in own_nodes(func) if isinstance(n, (ast.Return, ast.Raise))]
    for owner, stmt in _blocks_with_pass(func):
        if owner is func:
            continue  # a whole body: see sibling_repairs and attribute_repairs
        choices = list(dict.fromkeys(ends))
        if isinstance(owner, (ast.If, ast.While)):  # `if x > high: return high`
            choices += [f"return {n.id}" for n in ast.walk(owner.test) if isinstance(n, ast.Name)]
            choices = list(dict.fromkeys(choices))
        if any(isinstance(n, (ast.For, ast.While)) and _inside(stmt, n) for n in own_nodes(func)):
            choices += ["continue", "break"]
        row = module.lines[stmt.lineno - 1]
        for choice in choices[:4]:
            yield (f"line {stmt.lineno}: 'pass' → {choice!r}",
                   _replace_lines(module.lines, stmt.lineno, stmt.lineno, _indent(row) + choice))


def _inside(node: ast.AST, outer: ast.AST) -> bool:
    return outer.lineno < node.lineno <= (outer.end_lineno or 0)  # type: ignore[attr-defined]


def _params(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = func.args
    return [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]]


def _body_text(module: Module, func: ast.FunctionDef) -> list[str]:
    body = body_without_docstring(func.body)
    if not body:
        return []
    return module.lines[body[0].lineno - 1: body[-1].end_lineno]


def sibling_repairs(module: Module, func: ast.FunctionDef, modules: list[Module]
                    ) -> Iterator[tuple[str, str]]:
    """(description, new source): what another function of the repository with the same name
    and parameters (a sibling class's method, a twin helper) has: first the lines it has and
    ``func`` lacks, then, when ``func``'s body is only ``pass``, its whole body; failing a
    same-named one, a function of the same file with the same parameters and an analogous name
    (``singularize`` for ``pluralize``), its names mapped (``SINGULARS`` → ``PLURALS``)."""
    mine = _body_text(module, func)
    if not mine:
        return
    pad = _indent(mine[0])
    body = body_without_docstring(func.body)
    first, last = body[0].lineno, body[-1].end_lineno or body[0].lineno
    emptied = len(body) == 1 and isinstance(body[0], ast.Pass)
    seen = set()
    for _module, theirs, label in _siblings(module, func, modules, pad):
        merged = _with_insertions(mine, theirs)
        prologue = _prologue(mine, theirs, pad)
        for what, new_body in (("its missing lines", merged), ("its first lines", prologue),
                               ("its body", theirs)):
            if new_body and new_body != mine and tuple(new_body) not in seen \
                    and (what != "its body" or emptied):
                seen.add(tuple(new_body))
                yield (f"{func.name!r}: {what} from {label}",
                       _replace_lines(module.lines, first, last, "\n".join(new_body)))


def _siblings(module: Module, func: ast.FunctionDef, modules: list[Module], pad: str
              ) -> Iterator[tuple[Module, list[str], str]]:
    """(module, body lines re-indented to ``pad``, label) of the functions to learn from."""
    same: list[tuple[Module, ast.FunctionDef, dict[str, str]]] = []
    analogous: list[tuple[Module, ast.FunctionDef, dict[str, str]]] = []
    for other_module, _, other in _functions(modules):
        if other is func or _params(other) != _params(func):
            continue
        if other.name == func.name:
            same.append((other_module, other, {}))
        elif other_module is module:
            mapping = _analogy(other.name, func.name, module.bound_names())
            if mapping:
                analogous.append((other_module, other, mapping))
    for other_module, other, mapping in same or analogous:
        body = _body_text(other_module, other)
        if not body or (len(body) == 1 and body[0].strip() == "pass"):
            continue
        shift = _indent(body[0])
        body = [pad + row[len(shift):] if row.startswith(shift) else row for row in body]
        for old, new in mapping.items():
            body = [re.sub(rf"\b{re.escape(old)}\b", new, row) for row in body]
        yield other_module, body, f"{other_module.path}:{other.lineno}"


def _analogy(theirs: str, mine: str, names: set[str]) -> dict[str, str]:
    """For names sharing a suffix (``singularize``/``pluralize``), the module's names that
    differ the same way (``SINGULARS`` → ``PLURALS``); empty if none or the names share nothing."""
    k = 0
    while k < min(len(theirs), len(mine)) and theirs[-1 - k] == mine[-1 - k]:
        k += 1
    a, b = theirs[: len(theirs) - k], mine[: len(mine) - k]
    if k < 2 or len(a) < 3 or len(b) < 3:
        return {}
    mapping = {theirs: mine}
    for name in names:
        for x, y in ((a, b), (a.upper(), b.upper()), (a.capitalize(), b.capitalize())):
            if x in name and name.replace(x, y) in names:
                mapping[name] = name.replace(x, y)
    return mapping if len(mapping) > 1 else {}


def _prologue(mine: list[str], theirs: list[str], pad: str) -> list[str] | None:
    """``mine`` after the leading statements of ``theirs`` that ``mine`` does not have (a
    sibling's argument normalisation, ``if time is None: time = self.timer()``)."""
    try:
        tree = ast.parse("\n".join(row[len(pad):] if row.startswith(pad) else row
                                   for row in theirs))
    except SyntaxError:
        return None
    text = "\n".join(mine)
    lead = []
    for stmt in tree.body[:2]:  # guards and defaults: ``if`` statements only
        rows = theirs[stmt.lineno - 1: stmt.end_lineno]
        if not isinstance(stmt, ast.If) or any(row.strip() and row.strip() in text
                                               for row in rows):
            break
        lead += rows
    return lead + mine if lead else None


def _with_insertions(mine: list[str], theirs: list[str]) -> list[str] | None:
    """``mine`` with the lines only ``theirs`` has inserted where ``theirs`` has them (other
    differences kept as ``mine`` has them; a ``pass`` of ``mine`` may be replaced)."""
    out: list[str] = []
    inserted = False
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=mine, b=theirs).get_opcodes():
        if tag == "insert" or tag == "replace" and all(r.strip() == "pass" for r in mine[i1:i2]):
            out += theirs[j1:j2]
            inserted = True
        else:
            out += mine[i1:i2]
    return out if inserted else None


def attribute_repairs(module: Module, func: ast.FunctionDef, cls: ast.ClassDef | None,
                      wanted: list[str]) -> Iterator[tuple[str, str]]:
    """(description, new source): in a method, ``self.<attribute> = <parameter>`` for the
    parameters the body never reads whose name matches an attribute the class reads but never
    sets (``x``, ``_x``, ``__x``), or that the failing run found missing (``wanted``)."""
    if cls is None or not func.args.args or func.args.args[0].arg != "self":
        return
    read: set[str] = set()
    written: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            (written if isinstance(node.ctx, ast.Store) else read).add(node.attr)
    used = {n.id for n in own_nodes(func) if isinstance(n, ast.Name)}
    unused = [p for p in _params(func)[1:] if p not in used]
    assignments = []
    for param in unused:
        for attr in (param, "_" + param, f"_{cls.name.lstrip('_')}__{param}", "__" + param):
            if attr in wanted or attr in read and attr not in written:
                shown = f"__{param}" if attr.startswith(f"_{cls.name.lstrip('_')}__") else attr
                assignments.append(f"self.{shown} = {param}")
                break
    if not assignments:
        return
    body = body_without_docstring(func.body)
    pad = _indent(module.lines[func.body[0].lineno - 1])
    text = "\n".join(pad + a for a in assignments)
    if len(body) == 1 and isinstance(body[0], ast.Pass):
        new = _replace_lines(module.lines, body[0].lineno, body[0].lineno, text)
    elif body is not func.body:  # after the docstring
        new = _insert_after(module.lines, func.body[0].end_lineno or func.lineno, text)
    else:
        new = _insert_after(module.lines, func.body[0].lineno - 1, text)
    yield f"{func.name!r}: set {', '.join(assignments)}", new


def assignment_repairs(module: Module, func: ast.FunctionDef, name: str
                       ) -> Iterator[tuple[str, str]]:
    """(description, new source): ``name = <value>`` put before ``func``'s first read of
    ``name``, the value one that other functions of the file assign to that name, or that a
    function with the same parameters returns, made of names ``func`` has too."""
    available = local_names(func) | module.bound_names() | BUILTINS
    reads = [n for n in own_nodes(func) if isinstance(n, ast.Name) and n.id == name
             and isinstance(n.ctx, ast.Load)]
    reads += [n.target for n in own_nodes(func) if isinstance(n, ast.AugAssign)
              and isinstance(n.target, ast.Name) and n.target.id == name]
    if not reads:
        return
    first = min(reads, key=lambda n: (n.lineno, n.col_offset))
    stmt = min((s for s in own_nodes(func) if isinstance(s, ast.stmt)
                and s.lineno <= first.lineno <= (s.end_lineno or s.lineno)),
               key=lambda s: (s.end_lineno or s.lineno) - s.lineno, default=None)
    if stmt is None:
        return
    seen: set[str] = set()
    values: list[ast.expr] = []  # what other functions assign to the name, then what they return
    for _, other in iter_functions(module.tree):
        for node in own_nodes(other) if other is not func else ():
            if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                    and isinstance(node.targets[0], ast.Name) and node.targets[0].id == name:
                values.insert(0, node.value)
            elif isinstance(node, ast.Return) and node.value is not None \
                    and not isinstance(node.value, (ast.Name, ast.Constant)) \
                    and _params(other) == _params(func):  # a twin's result
                values.append(node.value)
    for value in values:
        needs = {n.id for n in ast.walk(value) if isinstance(n, ast.Name)}
        text = f"{name} = {ast.unparse(value)}"
        if needs <= available and name not in needs and text not in seen and len(seen) < 3:
            seen.add(text)
            row = module.lines[stmt.lineno - 1]
            yield (f"added '{text}' before line {stmt.lineno}",
                   _insert_after(module.lines, stmt.lineno - 1, _indent(row) + text))


def string_transforms(pairs: list[tuple[str, str]]) -> list[str]:
    """Python expressions over ``s`` that turn one side of every failing string comparison into
    the other, in one direction for all (the test's expected values as evidence): one
    character replaced by another everywhere, or a ``str`` method."""
    out = []
    for flip in (False, True):
        sides = [(b, a) if flip else (a, b) for a, b in pairs]
        if not sides or any(len(x) != len(y) for x, y in sides):
            continue
        changes = {(c, d) for x, y in sides for c, d in zip(x, y) if c != d}
        if len(changes) == 1:
            c, d = changes.pop()
            if all(x.replace(c, d) == y for x, y in sides):
                out.append(f"s.replace({c!r}, {d!r})")
        out += [f"s.{m}()" for m in STRING_METHODS
                if all(getattr(x, m)() == y for x, y in sides)]
    return list(dict.fromkeys(out))


def transform_repairs(module: Module, func: ast.FunctionDef, transforms: list[str]
                      ) -> Iterator[tuple[str, str]]:
    """(description, new source): the variable ``func`` returns (``return word`` or ``return
    word.lower()``) transformed as the failing comparisons ask, just before that return."""
    returns = [n for n in own_nodes(func) if isinstance(n, ast.Return) and n.value is not None]
    for ret in returns[-1:]:
        root = ret.value
        while isinstance(root, (ast.Call, ast.Attribute)):
            root = root.func if isinstance(root, ast.Call) else root.value
        if not isinstance(root, ast.Name):
            continue
        row = module.lines[ret.lineno - 1]
        for expression in transforms[:2]:
            text = f"{root.id} = {expression.replace('s.', root.id + '.', 1)}"
            yield (f"added '{text}' before the return (the failing comparisons' difference)",
                   _insert_after(module.lines, ret.lineno - 1, _indent(row) + text))


# ------------------------------------------------------------------------------ all together


def _enclosing(module: Module, line: int) -> tuple[ast.FunctionDef, ast.ClassDef | None] | None:
    best = None
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ClassDef):
            for child in node.body:
                child.parent_class = node  # type: ignore[attr-defined]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                and node.lineno <= line <= (node.end_lineno or node.lineno):
            if best is None or node.lineno > best.lineno:
                best = node
    if best is None:
        return None
    return best, getattr(best, "parent_class", None)  # type: ignore[return-value]


def candidates(failure: Failure, modules: list[Module], places: list[tuple[str, int]],
               is_stdlib) -> list[tuple[str, str, str]]:
    """(description, path, new source) of every repair the evidence suggests, most specific
    first: the errors' own suggestions (imports, parameters, returns), then what the suspicious
    functions' structure suggests. ``places`` are (path, line) of the traceback's frames
    (deepest first) and of the most suspicious lines."""
    by_path = {m.path: m for m in modules}
    found: list[tuple[str, str, str]] = []
    located: list[tuple[Module, ast.FunctionDef, ast.ClassDef | None]] = []
    for path, line in places:
        module = by_path.get(path)
        hit = _enclosing(module, line) if module else None
        if module and hit and all(hit[0] is not f for _, f, _ in located):
            located.append((module, hit[0], hit[1]))
    for name in failure.undefined:
        owners = [(m, f) for m, f, _ in located if name in free_names(f, m)]
        targets = list(dict.fromkeys([m.path for m, _ in owners] + [m.path for m, _, _ in located]))
        imports = [(d, p, s) for p in targets[:1]
                   for d, s in import_repairs(name, by_path[p], modules, is_stdlib)]
        params = [(d, m.path, s) for m, f in owners[:1]
                  for d, s in parameter_repairs(m, f, name, True, modules)]
        assigned = [(d, m.path, s) for m, f, _ in located[:2]
                    for d, s in assignment_repairs(m, f, name)]
        found += imports[:3] + assigned[:1] + params + assigned[1:] + imports[3:]
    for name in failure.unbound:
        found += [(d, m.path, s) for m, f, _ in located[:2] for d, s in
                  assignment_repairs(m, f, name)]
    for function, keyword in failure.keyword:
        found += _parameter_by_name(function, [keyword], modules, keyword=True)
    for function in failure.positional:
        found += _parameter_by_name(function, None, modules)
    if failure.none:
        named = [(m, f) for m, _, f in _functions(modules) if f.name in failure.none_from]
        found += [(d, m.path, s) for m, f in named[:2] for d, s in return_repairs(m, f)]
        found += [(d, m.path, s) for m, f, _ in located[:3] for d, s in return_repairs(m, f)]
    wanted = [attr for _, attr in failure.attributes]
    transforms = string_transforms(failure.strings)
    for module, func, cls in located[:3]:
        found += [(d, module.path, s) for d, s in no_effect_repairs(module, func)]
        found += [(d, module.path, s) for d, s in transform_repairs(module, func, transforms)]
        found += [(d, module.path, s) for d, s in pass_block_repairs(module, func)]
        found += [(d, module.path, s) for d, s in sibling_repairs(module, func, modules)]
        found += [(d, module.path, s) for d, s in attribute_repairs(module, func, cls, wanted)]
    out, seen = [], set()
    for description, path, source in found:
        if (path, source) not in seen and source != by_path[path].source and _parses(source):
            seen.add((path, source))
            out.append((description, path, source))
    return out


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def _parameter_by_name(function: str, names: list[str] | None, modules: list[Module],
                       keyword: bool = False) -> list[tuple[str, str, str]]:
    """Repairs for a function the failing run called with an argument it does not take: the
    keyword it was given, else each name its body reads that nothing binds."""
    out = []
    for module, qualname, func in _functions(modules):
        if qualname != function and not qualname.endswith("." + function) \
                and not function.endswith("." + qualname) and func.name != function:
            continue
        guesses = free_names(func, module) + read_before_set(func)
        for name in names if names is not None else guesses:
            out += [(d, module.path, s)
                    for d, s in parameter_repairs(module, func, name, False, modules, keyword)]
    return out


# ------------------------------------------------------------------------------ the command


def in_stdlib(name: str) -> bool:
    """Whether ``name`` is a standard-library module of this interpreter (its file lies in the
    stdlib folder, or it is built in), never a third-party or repository module."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    stdlib = sysconfig.get_paths()["stdlib"]
    origin = spec.origin or ""
    return origin.startswith(stdlib) and "site-packages" not in origin


def load_modules(root: Path) -> list[Module]:
    """The repository's non-test Python sources that parse, in path order."""
    from cwm_forager.pytest_plugin import is_test_file  # noqa: PLC0415 (it imports pytest)

    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p.startswith(".") or p in ("build", "docs", "site-packages") for p in rel.parts) \
                or is_test_file(str(rel)) or rel.name in ("setup.py", "conftest.py"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            out.append(Module(str(rel), source, ast.parse(source)))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("failure", type=Path, help="the failing pytest run's output")
    parser.add_argument("--at", action="append", default=[], metavar="PATH:LINE",
                        help="a traceback frame or suspicious line (most telling first)")
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--max", type=int, default=MAX_CANDIDATES)
    args = parser.parse_args(argv)
    failure = read_failure(args.failure.read_text(encoding="utf-8", errors="replace"))
    places = []
    for place in args.at:
        path, _, line = place.rpartition(":")
        if not line.isdigit():
            parser.error(f"--at {place!r}: expected PATH:LINE")
        places.append((path, int(line)))
    modules = load_modules(args.root)
    by_path = {m.path: m for m in modules}
    shown = 0
    for description, path, source in candidates(failure, modules, places, in_stdlib):
        edit = to_edit(by_path[path].source, source)
        if edit is None:
            continue
        print(json.dumps({"repair": description, "path": path, "search": edit[0],
                          "replace": edit[1]}))
        shown += 1
        if shown >= args.max:
            break
    if not shown:
        print("no repair suggested by the evidence")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
