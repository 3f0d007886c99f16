"""A small, strict Dockerfile reader for static checks (fast, and no engine needed).

It understands what our Dockerfiles use: comments and parser directives, line continuations,
heredocs (`RUN cmd <<'EOF' ... EOF`), `--flag=value` options, exec (JSON) and shell forms, global
ARGs substituted into FROM, stages, and `.dockerignore` patterns with `!` exceptions.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_HEREDOC = re.compile(r"<<-?(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class DockerfileError(ValueError):
    """The Dockerfile cannot be read; the message names the file and line."""


@dataclass
class Instruction:
    keyword: str            # upper case: FROM, RUN, COPY...
    flags: dict[str, str]   # --from=build -> {"from": "build"}
    args: str               # the rest of the line, continuations joined
    heredocs: list[str]     # bodies of heredocs, in order
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT/CMD/RUN, or None for the shell form."""
        text = self.args.strip()
        if text.startswith("["):
            value = json.loads(text)
            if not all(isinstance(v, str) for v in value):
                raise DockerfileError(f"line {self.line}: exec form must be strings")
            return value
        return None

    def words(self) -> list[str]:
        return shlex.split(self.args)


@dataclass
class Stage:
    base: str                # the image after ARG substitution, or a previous stage's name
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def stage_args(self, stage: Stage) -> dict[str, str]:
        """ARG defaults visible in a stage: the global ones it redeclares, and its own."""
        values: dict[str, str] = {}
        for ins in stage.all("ARG"):
            key, _, default = ins.args.partition("=")
            key = key.strip()
            values[key] = _unquote(default) if default else self.global_args.get(key, "")
        return values


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def substitute(text: str, values: dict[str, str]) -> str:
    return _VAR.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def _logical_lines(text: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(first line number, joined instruction text, heredoc bodies)."""
    lines = text.splitlines()
    out: list[tuple[int, str, list[str]]] = []
    i = 0
    while i < len(lines):
        raw = lines[i]
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        start = i + 1
        parts = [raw]
        while parts[-1].rstrip().endswith("\\"):
            parts[-1] = parts[-1].rstrip()[:-1]
            i += 1
            # comment lines inside a continuation are dropped, as Docker does
            while i < len(lines) and lines[i].strip().startswith("#"):
                i += 1
            if i >= len(lines):
                raise DockerfileError(f"{path}:{start}: continuation runs past the end")
            parts.append(lines[i])
        joined = " ".join(p.strip() for p in parts)
        bodies: list[str] = []
        for match in _HEREDOC.finditer(joined):
            body: list[str] = []
            i += 1
            while i < len(lines) and lines[i].strip() != match.group(2):
                body.append(lines[i])
                i += 1
            if i >= len(lines):
                raise DockerfileError(f"{path}:{start}: heredoc {match.group(2)} is not closed")
            bodies.append("\n".join(body) + "\n")
        out.append((start, joined, bodies))
        i += 1
    return out


def parse(path: Path) -> Dockerfile:
    text = path.read_text()
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, joined, bodies in _logical_lines(text, path):
        keyword, _, rest = joined.partition(" ")
        keyword = keyword.upper()
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.strip()
        ins = Instruction(keyword, flags, rest, bodies, line)
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            if len(words) not in (1, 3):
                raise DockerfileError(f"{path}:{line}: cannot read FROM {rest!r}")
            stages.append(Stage(substitute(words[0], global_args), name))
        elif not stages:
            if keyword != "ARG":
                raise DockerfileError(f"{path}:{line}: {keyword} before the first FROM")
            key, _, default = rest.partition("=")
            global_args[key.strip()] = _unquote(default)
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise DockerfileError(f"{path}: no FROM")
    return Dockerfile(path, global_args, stages)


# ----- .dockerignore ------------------------------------------------------------------------

def read_dockerignore(path: Path) -> list[tuple[bool, str]]:
    """(is_exception, pattern) in file order."""
    rules: list[tuple[bool, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        rules.append((negate, pattern.strip("/")))
    return rules


def _matches(pattern: str, path: str) -> bool:
    """Docker's matching: a pattern excludes a path when it matches the path or one of its
    parent folders; `**` matches any number of folders."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
    regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return any(re.fullmatch(regex, c) for c in candidates)


def ignored(rules: list[tuple[bool, str]], path: str) -> bool:
    """Whether `path` (relative to the context) is left out of the build context: the last
    matching rule wins."""
    result = False
    for negate, pattern in rules:
        if _matches(pattern, path):
            result = not negate
    return result
