"""Small random Python functions that always terminate, with inputs: data a tiny model can learn.

Programs work on ints, strings and lists of ints, with assignments, branches and bounded loops
(``for`` over ``range(k)`` with a literal ``k`` <= 5, or over a parameter of at most 6 elements);
there are no ``while`` loops and no recursion, and every value stays small, so each program
finishes in microseconds. Generation is a pure function of ``(seed, index)``.

The held-out split is decided by the program's hash like every other trace
(:func:`cwm_beam.traces.split_of`), so a program seen in validation is never in training, whatever
input it was run on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

_LETTERS = "abcdexyz"


@dataclass
class _Builder:
    rng: random.Random
    types: dict[str, str] = field(default_factory=dict)   # variable -> int | str | list
    lines: list[str] = field(default_factory=list)
    fresh: int = 0
    params: list[str] = field(default_factory=list)  # the function's parameters

    def names(self, kind: str) -> list[str]:
        return [name for name, t in self.types.items() if t == kind]

    def new_name(self, kind: str) -> str:
        self.fresh += 1
        return {"int": "n", "str": "s", "list": "xs"}[kind] + str(self.fresh)

    # ---- expressions ---------------------------------------------------------------------
    def expr(self, kind: str, depth: int = 0) -> str:
        rng, names = self.rng, self.names(kind)
        if names and (depth > 1 or rng.random() < 0.4):
            return rng.choice(names)
        if kind == "int":
            choices = [lambda: str(rng.randint(0, 9))]
            if names:
                choices += [lambda: f"{self.expr('int', depth + 1)} {rng.choice('+-')} "
                                    f"{self.expr('int', depth + 1)}",
                            lambda: f"{rng.choice(names)} * {rng.randint(2, 3)}",
                            lambda: f"{rng.choice(names)} % {rng.randint(2, 7)}",
                            lambda: f"{rng.choice(['max', 'min'])}({rng.choice(names)}, "
                                    f"{rng.randint(0, 9)})"]
            if self.names("str") or self.names("list"):
                choices.append(lambda: f"len({rng.choice(self.names('str') + self.names('list'))})")
            if self.names("list"):
                choices.append(lambda: f"sum({rng.choice(self.names('list'))})")
            return rng.choice(choices)()
        if kind == "str":
            choices = [lambda: repr("".join(rng.choice(_LETTERS) for _ in range(rng.randint(0, 3))))]
            if names:
                choices += [lambda: f"{rng.choice(names)}[::-1]",
                            lambda: f"{rng.choice(names)}.upper()",
                            lambda: f"{rng.choice(names)}[{rng.randint(0, 2)}:]",
                            lambda: f"{self.expr('str', depth + 1)} + {self.expr('str', depth + 1)}"]
            if self.names("int"):
                choices.append(lambda: f"str({rng.choice(self.names('int'))})")
            return rng.choice(choices)()
        choices = [lambda: f"[{', '.join(str(rng.randint(0, 9)) for _ in range(rng.randint(0, 3)))}]"]
        if names:
            choices += [lambda: f"sorted({rng.choice(names)})",
                        lambda: f"{rng.choice(names)}[1:]",
                        lambda: f"{rng.choice(names)}[::-1]"]
        return rng.choice(choices)()

    def condition(self) -> str:
        rng = self.rng
        options = []
        if self.names("int"):
            n = rng.choice(self.names("int"))
            options += [f"{n} > {rng.randint(0, 9)}", f"{n} % 2 == 0",
                        f"{n} < {self.expr('int', 2)}"]
        if self.names("str"):
            s = rng.choice(self.names("str"))
            options += [f"len({s}) > {rng.randint(0, 4)}", f"{s!s}.startswith({rng.choice(_LETTERS)!r})",
                        f"{rng.choice(_LETTERS)!r} in {s}"]
        if self.names("list"):
            xs = rng.choice(self.names("list"))
            options += [f"{rng.randint(0, 9)} in {xs}", f"len({xs}) > {rng.randint(0, 4)}"]
        return rng.choice(options or ["True"])

    # ---- statements ----------------------------------------------------------------------
    def block(self, indent: int, budget: int, depth: int) -> None:
        before = len(self.lines)
        for _ in range(budget):
            self.statement(indent, depth)
        if len(self.lines) == before:
            self.lines.append("    " * indent + "pass")

    def statement(self, indent: int, depth: int) -> None:
        rng, pad = self.rng, "    " * indent
        roll = rng.random()
        if depth < 2 and roll < 0.2:
            self.lines.append(f"{pad}if {self.condition()}:")
            self.block(indent + 1, rng.randint(1, 2), depth + 1)
            if rng.random() < 0.5:
                self.lines.append(f"{pad}else:")
                self.block(indent + 1, rng.randint(1, 2), depth + 1)
        elif depth < 2 and roll < 0.4:
            iterables = [f"range({rng.randint(1, 5)})"] + [
                n for n in self.names("list") + self.names("str") if n in self.params]
            target = rng.choice(iterables)
            var = f"i{self.fresh + 1}" if target.startswith("range") or \
                self.types[target] == "list" else f"c{self.fresh + 1}"
            self.fresh += 1
            self.lines.append(f"{pad}for {var} in {target}:")
            saved = dict(self.types)
            self.types[var] = "str" if var.startswith("c") else "int"
            self.block(indent + 1, rng.randint(1, 2), depth + 1)
            self.types = saved  # the loop variable may be unbound after zero iterations
        elif roll < 0.55 and self.names("list") and depth == 0:
            self.lines.append(f"{pad}{rng.choice(self.names('list'))}.append({self.expr('int')})")
        elif roll < 0.75 and (self.names("int") or self.names("str")):
            kind = rng.choice([k for k in ("int", "str") if self.names(k)])
            target = rng.choice(self.names(kind))
            value = self.expr(kind, 1) if kind == "str" else str(rng.randint(1, 5))
            self.lines.append(f"{pad}{target} += {value}")
            if kind == "str":  # keep strings short inside loops
                self.lines.append(f"{pad}{target} = {target}[:12]")
        else:
            kind = rng.choice(["int", "str", "list"])
            if depth == 0 or rng.random() < 0.5:
                existing = self.names(kind)
                name = rng.choice(existing) if existing and rng.random() < 0.5 else None
            else:
                name = rng.choice(self.names(kind)) if self.names(kind) else None
            value = self.expr(kind)
            if name is None:
                if depth > 0:   # a name first bound inside a branch or loop may be unbound later
                    return self.statement(indent, 2) if depth < 2 else None
                name = self.new_name(kind)
            self.lines.append(f"{pad}{name} = {value}")
            self.types[name] = kind


def generate_program(seed: int, index: int) -> dict[str, str]:
    """One program and one input: ``{"id", "code", "entry", "input"}``, a pure function of
    ``(seed, index)``."""
    rng = random.Random(f"cwm-synthetic/{seed}/{index}")
    builder = _Builder(rng)
    kinds = [rng.choice(["int", "str", "list"]) for _ in range(rng.randint(1, 3))]
    params = [f"{k[0] if k != 'list' else 'xs'}{i}" for i, k in enumerate(kinds)]
    builder.params = params
    for name, kind in zip(params, kinds):
        builder.types[name] = kind
    builder.lines.append(f"def f({', '.join(params)}):")
    builder.block(1, rng.randint(3, 6), 0)
    kind = rng.choice(["int", "str", "list"])
    builder.lines.append(f"    return {builder.expr(kind)}")
    code = "\n".join(builder.lines)
    args = ", ".join(repr(_value(rng, k)) for k in kinds)
    return {"id": f"synthetic/{seed}-{index}", "code": code, "entry": "f", "input": args}


def _value(rng: random.Random, kind: str):
    if kind == "int":
        return rng.randint(-5, 20)
    if kind == "str":
        return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(0, 6)))
    return [rng.randint(0, 9) for _ in range(rng.randint(0, 6))]


def generate(seed: int, count: int, start: int = 0) -> Iterator[dict[str, str]]:
    for index in range(start, start + count):
        yield generate_program(seed, index)
