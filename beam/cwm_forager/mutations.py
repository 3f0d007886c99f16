"""Synthetic bugs: CWM's five mutate-fix mutation families, found and applied on the AST.

Pure functions over source text. Each mutation is a small list of character-span edits located
with the AST's positions, so the rest of the file (comments, formatting) is untouched and the
gold patch (the reverse diff) is exactly the bug. Families (CWM tech report, ForagerAgent):

- ``body_removal``: remove one statement of a function body, or all of it (``pass`` left).
- ``parameter_removal``: remove a parameter from a ``def``, or swap two positional call arguments.
- ``variable_swap``: swap two different local variables read in one statement.
- ``import_return_removal``: drop an import a function uses, or the ``return`` keyword.
- ``operator_replacement``: replace a binary, comparison, boolean, unary or augmented operator.

The same operators, run "in reverse" on a suspicious line, are the candidate edits of the
search-based repair policy (:func:`line_candidates`).
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

FAMILIES = (
    "body_removal",
    "parameter_removal",
    "variable_swap",
    "import_return_removal",
    "operator_replacement",
)

# Replacements: each operator maps to the operators it may be mutated into.
BINOPS: dict[type, tuple[str, tuple[str, ...]]] = {
    ast.Add: ("+", ("-",)),
    ast.Sub: ("-", ("+",)),
    ast.Mult: ("*", ("/", "+")),
    ast.Div: ("/", ("*", "//")),
    ast.FloorDiv: ("//", ("/", "*")),
    ast.Mod: ("%", ("//",)),
    ast.Pow: ("**", ("*",)),
    ast.LShift: ("<<", (">>",)),
    ast.RShift: (">>", ("<<",)),
    ast.BitAnd: ("&", ("|",)),
    ast.BitOr: ("|", ("&",)),
    ast.BitXor: ("^", ("|",)),
}
CMPOPS: dict[type, tuple[str, tuple[str, ...]]] = {
    ast.Lt: ("<", ("<=", ">")),
    ast.LtE: ("<=", ("<", ">=")),
    ast.Gt: (">", (">=", "<")),
    ast.GtE: (">=", (">", "<=")),
    ast.Eq: ("==", ("!=",)),
    ast.NotEq: ("!=", ("==",)),
    ast.Is: ("is", ("is not",)),
    ast.IsNot: ("is not", ("is",)),
    ast.In: ("in", ("not in",)),
    ast.NotIn: ("not in", ("in",)),
}
BOOLOPS = {ast.And: ("and", ("or",)), ast.Or: ("or", ("and",))}


def _inverse(table: dict[type, tuple[str, tuple[str, ...]]]) -> dict[type, tuple[str, tuple[str, ...]]]:
    """For repairs: the operators that mutate *into* each operator (``*`` came from ``/``,
    ``+`` or ``//``)."""
    node_of = {op: node for node, (op, _) in table.items()}
    out: dict[type, list[str]] = {node: [] for node in table}
    for op, alternatives in table.values():
        for alt in alternatives:
            if alt in node_of:
                out[node_of[alt]].append(op)
    return {node: (table[node][0], tuple(ops)) for node, ops in out.items()}


INVERSE_BINOPS = _inverse(BINOPS)
INVERSE_CMPOPS = _inverse(CMPOPS)


@dataclass(frozen=True)
class Edit:
    """Replace ``source[start:end]`` with ``text`` (character offsets)."""

    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Mutation:
    """One candidate bug in one file. ``function`` is the qualified name of the enclosing
    function and ``line`` the 1-based line of the change."""

    family: str
    path: str
    function: str
    line: int
    description: str
    edits: tuple[Edit, ...]

    @property
    def key(self) -> str:
        """Stable identifier (same source, same mutation → same key)."""
        spans = ",".join(f"{e.start}-{e.end}" for e in self.edits)
        return f"{self.path}:{self.line}:{self.family}:{spans}:{self.description}"


def apply_edits(source: str, edits: Iterable[Edit]) -> str:
    """Apply non-overlapping edits (any order) to ``source``."""
    out = source
    for edit in sorted(edits, key=lambda e: e.start, reverse=True):
        out = out[: edit.start] + edit.text + out[edit.end :]
    return out


def unified_diff(before: str, after: str, path: str) -> str:
    """A git-style unified diff of one file (``a/path`` → ``b/path``)."""
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=f"a/{path}",
        tofile=f"b/{path}",
    )
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                   for line in lines)


class SourceMap:
    """Converts the AST's (line, UTF-8 byte column) positions into character offsets."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines = source.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1] if lineno - 1 < len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode()[:col].decode(errors="ignore"))

    def start(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]

    def end(self, node: ast.AST) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]

    def text(self, node: ast.AST) -> str:
        return self.source[self.start(node) : self.end(node)]


# ----------------------------------------------------------------------------- function walking


def iter_functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Yield (qualified name, node) for every function, methods and nested ones included."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")  # type: ignore[misc]


def own_nodes(func: ast.AST) -> Iterator[ast.AST]:
    """Nodes inside ``func`` that are not inside a nested function, class or lambda."""
    stack = list(ast.iter_child_nodes(func))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def body_without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1:]
    return body


def local_names(func: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Parameters and names the function itself assigns."""
    a = func.args
    names = {arg.arg for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]}
    names |= {arg.arg for arg in (a.vararg, a.kwarg) if arg is not None}
    for node in own_nodes(func):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _code_part(text: str) -> str:
    """``text`` with comments blanked (same length), so operator search ignores them."""
    return re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), text)


def _replacements(line: int, op: str, alts: Sequence[str], span: tuple[int, int] | None
                  ) -> Iterator[tuple[int, str, tuple[Edit, ...]]]:
    """One mutation per alternative operator, where the operator was found (``span``)."""
    if span is not None:
        for alt in alts:
            yield line, f"replaced {op!r} with {alt!r}", (Edit(span[0], span[1], alt),)


def _find_op(sm: SourceMap, lo: int, hi: int, op: str) -> tuple[int, int] | None:
    """Character span of operator ``op`` between offsets ``lo`` and ``hi``."""
    between = _code_part(sm.source[lo:hi])
    if op[0].isalpha():
        pattern = r"\b" + r"\s+".join(op.split()) + r"\b"
    else:
        pattern = r"(?<![=<>!*/])" + re.escape(op) + r"(?![=<>*/])"
    match = re.search(pattern, between)
    return (lo + match.start(), lo + match.end()) if match else None


# ----------------------------------------------------------------------------- the families


def _operator_mutations(sm: SourceMap, nodes: Sequence[ast.AST], inverse: bool = False
                        ) -> Iterator[tuple[int, str, tuple[Edit, ...]]]:
    binops, cmpops = (INVERSE_BINOPS, INVERSE_CMPOPS) if inverse else (BINOPS, CMPOPS)
    for node in nodes:
        if isinstance(node, ast.BinOp) and type(node.op) in binops:
            if isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
                continue  # '%'-formatting and string concatenation: not arithmetic
            op, alts = binops[type(node.op)]
            span = _find_op(sm, sm.end(node.left), sm.start(node.right), op)
            yield from _replacements(node.lineno, op, alts, span)
        elif isinstance(node, ast.AugAssign) and type(node.op) in binops:
            op, alts = binops[type(node.op)]
            span = _find_op(sm, sm.end(node.target), sm.start(node.value), op + "=")
            yield from _replacements(node.lineno, op + "=", [a + "=" for a in alts[:1]], span)
        elif isinstance(node, ast.Compare):
            left = node.left
            for cmp_op, right in zip(node.ops, node.comparators):
                op, alts = cmpops[type(cmp_op)]
                span = _find_op(sm, sm.end(left), sm.start(right), op)
                yield from _replacements(node.lineno, op, alts, span)
                left = right
        elif isinstance(node, ast.BoolOp):
            op, alts = BOOLOPS[type(node.op)]
            span = _find_op(sm, sm.end(node.values[0]), sm.start(node.values[1]), op)
            if span:
                yield node.lineno, f"replaced {op!r} with {alts[0]!r}", (Edit(*span, alts[0]),)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            op = "not" if isinstance(node.op, ast.Not) else "-"
            yield node.lineno, f"removed unary {op!r}", (Edit(sm.start(node), sm.start(node.operand), ""),)


def _statement_expressions(stmt: ast.stmt) -> list[ast.AST]:
    """The expressions a statement evaluates itself (not those of nested blocks)."""
    if isinstance(stmt, (ast.If, ast.While)):
        return [stmt.test]
    if isinstance(stmt, (ast.For, ast.AsyncFor)):
        return [stmt.iter]
    if isinstance(stmt, (ast.With, ast.AsyncWith)):
        return [item.context_expr for item in stmt.items]
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Try)):
        return []
    return [stmt]


def _swap_mutations(sm: SourceMap, func: ast.AST, stmts: Sequence[ast.stmt],
                    every_occurrence: bool = False) -> Iterator[tuple[int, str, tuple[Edit, ...]]]:
    """Swap the first reads of two different locals in one statement. For repairs
    (``every_occurrence``) any two reads may have been the swapped ones: first reads come first."""
    locals_ = local_names(func)  # type: ignore[arg-type]
    for stmt in stmts:
        reads = sorted((node for expr in _statement_expressions(stmt) for node in ast.walk(expr)
                        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
                        and node.id in locals_), key=sm.start)
        firsts = list({n.id: n for n in reversed(reads)}.values())[::-1]
        firsts.sort(key=sm.start)
        pairs = [(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :]]
        if every_occurrence:
            pairs += [(a, b) for i, a in enumerate(reads) for b in reads[i + 1 :]
                      if a.id != b.id and (a, b) not in pairs]
        for a, b in pairs:
            yield stmt.lineno, f"swapped {a.id!r} and {b.id!r}", (
                Edit(sm.start(a), sm.end(a), b.id), Edit(sm.start(b), sm.end(b), a.id))


def _parameter_mutations(sm: SourceMap, func: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool,
                         nodes: Sequence[ast.AST]) -> Iterator[tuple[int, str, tuple[Edit, ...]]]:
    args = func.args.args
    defaults: list[ast.expr | None] = [None] * (len(args) - len(func.args.defaults)) + list(func.args.defaults)
    first = 1 if is_method else 0
    ends = [sm.end(d) if d is not None else sm.end(a) for a, d in zip(args, defaults)]
    for i in range(first, len(args)):
        if len(args) - first < 2 or func.args.vararg or func.args.posonlyargs:
            break
        if i + 1 < len(args):
            span = (sm.start(args[i]), sm.start(args[i + 1]))
        else:
            span = (ends[i - 1], ends[i])
        yield func.lineno, f"removed parameter {args[i].arg!r}", (Edit(*span, ""),)
    for node in nodes:
        if isinstance(node, ast.Call) and len(node.args) >= 2 \
                and not any(isinstance(a, ast.Starred) for a in node.args):
            for a, b in zip(node.args, node.args[1:]):
                ta, tb = sm.text(a), sm.text(b)
                if ta != tb:
                    yield node.lineno, f"reordered call arguments {ta!r} and {tb!r}", (
                        Edit(sm.start(a), sm.end(a), tb), Edit(sm.start(b), sm.end(b), ta))


def _import_return_mutations(sm: SourceMap, tree: ast.Module, func: ast.AST,
                             nodes: Sequence[ast.AST]) -> Iterator[tuple[int, str, tuple[Edit, ...]]]:
    for node in nodes:
        if isinstance(node, ast.Return) and node.value is not None \
                and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            yield node.lineno, "removed 'return'", (Edit(sm.start(node), sm.start(node.value), ""),)
    used = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    used |= {n.value.id for n in nodes if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    imports = [n for n in [*tree.body, *nodes] if isinstance(n, (ast.Import, ast.ImportFrom))]
    for imp in imports:
        for alias in imp.names:
            bound = alias.asname or alias.name.split(".")[0]
            if bound not in used or alias.name == "*":
                continue
            if len(imp.names) == 1:
                edit = Edit(sm.start(imp), sm.end(imp), "pass")
            else:
                rest = [a for a in imp.names if a is not alias]
                clone = ast.ImportFrom(imp.module, rest, imp.level) if isinstance(imp, ast.ImportFrom) \
                    else ast.Import(rest)
                edit = Edit(sm.start(imp), sm.end(imp), ast.unparse(clone))
            yield func.lineno, f"removed import of {bound!r} (line {imp.lineno})", (edit,)  # type: ignore[attr-defined]


def _blocks(func: ast.AST) -> Iterator[list[ast.stmt]]:
    """Every statement list (block) of the function, nested blocks included."""
    for node in [func, *own_nodes(func)]:
        nested = node is not func and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if isinstance(node, ast.ClassDef) or nested:
            continue
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield block
        for handler in getattr(node, "handlers", []) or []:
            yield handler.body


def _whole_lines(sm: SourceMap, stmt: ast.stmt) -> tuple[int, int]:
    """The statement's span widened to whole lines when it has its lines to itself, so that
    removing it leaves no blank indented line behind."""
    start, end = sm.start(stmt), sm.end(stmt)
    line_start = sm.starts[stmt.lineno - 1]
    last = stmt.end_lineno or stmt.lineno
    line_end = sm.starts[last] if last < len(sm.starts) else len(sm.source)
    if sm.source[line_start:start].strip() == "" and sm.source[end:line_end].strip() == "":
        return line_start, line_end
    return start, end


def _body_mutations(sm: SourceMap, func: ast.FunctionDef | ast.AsyncFunctionDef
                    ) -> Iterator[tuple[int, str, tuple[Edit, ...]]]:
    body = body_without_docstring(func.body)
    if len(body) >= 2:
        yield body[0].lineno, f"removed the body of {func.name!r}", (Edit(sm.start(body[0]), sm.end(body[-1]), "pass"),)
    for block in _blocks(func):
        stmts = body_without_docstring(block) if block is func.body else block
        for stmt in stmts:
            if isinstance(stmt, (ast.Pass, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(stmt, ast.Return) and stmt is stmts[-1] and block is func.body:
                continue  # that is return removal
            if len(stmts) == 1:
                edit = Edit(sm.start(stmt), sm.end(stmt), "pass")
            else:
                edit = Edit(*_whole_lines(sm, stmt), "")
            yield stmt.lineno, f"removed statement at line {stmt.lineno}", (edit,)


# ----------------------------------------------------------------------------- entry points


def _family_mutations(family: str, sm: SourceMap, tree: ast.Module,
                      func: ast.FunctionDef | ast.AsyncFunctionDef, nodes: list[ast.AST],
                      is_method: bool) -> Iterator[tuple[int, str, tuple[Edit, ...]]]:
    """The candidate mutations of one family in one function."""
    if family == "operator_replacement":
        return _operator_mutations(sm, nodes)
    if family == "variable_swap":
        return _swap_mutations(sm, func, [n for n in nodes if isinstance(n, ast.stmt)])
    if family == "parameter_removal":
        return _parameter_mutations(sm, func, is_method, nodes)
    if family == "import_return_removal":
        return _import_return_mutations(sm, tree, func, nodes)
    return _body_mutations(sm, func)


def find_mutations(source: str, path: str, families: Sequence[str] = FAMILIES,
                   functions: set[str] | None = None) -> list[Mutation]:
    """All valid mutations of ``source`` in the given families, restricted to the named
    functions (qualified names) if given. A mutation is valid if the result still compiles and
    its AST differs from the original."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"mutation_families: unknown {sorted(unknown)}; choose from {FAMILIES}")
    tree = ast.parse(source)
    sm = SourceMap(source)
    original = ast.dump(tree)
    out: list[Mutation] = []
    seen: set[str] = set()
    class_methods = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for n in c.body}
    for qualname, func in iter_functions(tree):
        if functions is not None and qualname not in functions:
            continue
        nodes = list(own_nodes(func))
        for family in families:
            for line, description, edits in _family_mutations(
                    family, sm, tree, func, nodes, id(func) in class_methods):
                mutated = apply_edits(source, edits)
                try:
                    changed = ast.dump(ast.parse(mutated)) != original
                except SyntaxError:
                    continue
                mutation = Mutation(family, path, qualname, line, description, edits)
                if changed and mutation.key not in seen:
                    seen.add(mutation.key)
                    out.append(mutation)
    return out


def function_lines(source: str) -> dict[str, tuple[int, int]]:
    """Qualified function name → (first line, last line), decorators excluded."""
    return {name: (f.lineno, f.end_lineno or f.lineno) for name, f in iter_functions(ast.parse(source))}


def _negatable(nodes: Sequence[ast.AST]) -> list[ast.AST]:
    """Expressions used as truth values on a line: conditions, boolean operands, returns."""
    out: list[ast.AST] = []
    for node in nodes:
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            out.append(node.test)
        elif isinstance(node, ast.BoolOp):
            out.extend(node.values)
        elif isinstance(node, ast.Return) and node.value is not None:
            out.append(node.value)
    return [e for e in out if not (isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.Not))]


def line_candidates(source: str, line: int) -> list[tuple[str, str]]:
    """Candidate repairs for one line: (description, new source), from the inverse of the
    operator-replacement, variable-swap, argument-reordering and return-removal mutations.

    Inverse operators: replacing an operator and swapping variables or arguments undo
    themselves; a missing ``return`` is undone by adding one to an expression statement."""
    tree = ast.parse(source)
    sm = SourceMap(source)
    found: list[tuple[int, int, int, str, str]] = []  # (kind, position, order, description, new)
    seen = {source}

    def add(description: str, edits: Sequence[Edit]) -> None:
        new = apply_edits(source, edits)
        if new in seen:
            return
        try:
            ast.parse(new)
        except SyntaxError:
            return
        seen.add(new)
        found.append((0, min(e.start for e in edits), len(found), description, new))

    for _, func in iter_functions(tree):
        if not (func.lineno <= line <= (func.end_lineno or func.lineno)):
            continue
        nodes = sorted((n for n in own_nodes(func) if getattr(n, "lineno", None) == line),
                       key=lambda n: (n.col_offset, -(n.end_col_offset or 0)))  # type: ignore[attr-defined]
        stmts = [n for n in nodes if isinstance(n, ast.stmt)]
        for _, description, edits in _operator_mutations(sm, nodes, inverse=True):
            add(description, edits)
        for expr in _negatable(nodes):  # inverse of removing a unary 'not'
            wrap = isinstance(expr, (ast.BoolOp, ast.IfExp, ast.Lambda, ast.NamedExpr))
            add("added 'not'", (Edit(sm.start(expr), sm.start(expr), "not (" if wrap else "not "),
                                Edit(sm.end(expr), sm.end(expr), ")" if wrap else "")))
        for node in nodes:  # inverse of removing a unary '-'
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(node, (ast.Constant, ast.Name)) \
                    and not isinstance(value, (str, bytes, bool)) \
                    and isinstance(getattr(node, "ctx", ast.Load()), ast.Load):
                add("added unary '-'", (Edit(sm.start(node), sm.start(node), "-"),))
        for _, description, edits in _swap_mutations(sm, func, stmts, every_occurrence=True):
            add(description, edits)
        for node in nodes:
            if isinstance(node, ast.Call) and len(node.args) >= 2:
                for a, b in zip(node.args, node.args[1:]):
                    add(f"reordered arguments {sm.text(a)!r} and {sm.text(b)!r}",
                        (Edit(sm.start(a), sm.end(a), sm.text(b)),
                         Edit(sm.start(b), sm.end(b), sm.text(a))))
            if isinstance(node, ast.Expr) and not isinstance(
                    node.value, (ast.Constant, ast.Yield, ast.YieldFrom, ast.Await)):
                add("added 'return'", (Edit(sm.start(node), sm.start(node), "return "),))
    # within each kind of repair, in the order the code reads (left to right)
    kinds = {d.split(" ")[0]: None for _, _, _, d, _ in found}
    order = {k: i for i, k in enumerate(kinds)}
    found.sort(key=lambda f: (order[f[3].split(" ")[0]], f[1], f[2]))
    return [(description, new) for _, _, _, description, new in found]
