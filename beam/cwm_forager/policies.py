"""Policies that act in repository environments.

:class:`OpenAIPolicy`
    Any OpenAI-compatible chat endpoint with tool calling (vLLM, SGLang, ``cwm serve``),
    through the ``openai`` client.
:class:`SearchRepairPolicy`
    Needs no model. Like a careful engineer with a fault localiser: it runs the failing tests
    and reads the traceback, runs the tests again with line coverage and ranks lines by Ochiai
    suspiciousness (``python -m cwm_forager.sbfl``), asks the repair helper what the failing
    run's evidence suggests (``python -m cwm_forager.repair``: a missing import from a
    ``NameError``, a lost parameter from a ``TypeError`` about arguments, a lost ``return``, a
    statement a sibling function has, a block left holding only ``pass``) and tries those edits,
    each from the pristine file; then reads the suspicious functions with ``bash`` (numbered
    lines; a pristine copy kept under ``.cwm/``) and tries candidate edits (inverse mutation
    operators: operator replacement, variable and argument swaps, a missing ``return``) one at
    a time, rerunning the failing tests after each; after a passing regression run it
    writes its patch (git diff format, ``.cwm/fix.diff``) and submits that path, as CWM's
    ``submit`` takes. Everything it knows comes from its own tool observations, never from the
    task's hidden fields.
"""

from __future__ import annotations

import json
import re
import shlex
import textwrap
from collections.abc import Generator, Sequence
from typing import Any

from cwm_forager.mutations import line_candidates
from cwm_forager.rollout import Action
from cwm_forager.sbfl import ROW

_FRAME = re.compile(r"^(?P<path>[^\s:]+\.py):(?P<line>\d+): in (?P<func>\S+)", re.M)
_VIEW_LINE = re.compile(r"^\s*(\d+)\t(.*)$")
PATCH = ".cwm/fix.diff"
FAILURE = ".cwm/failure.txt"  # the failing run's output, for the repair helper
_TEST_ID = re.compile(r"^  (\S+::\S.*)$", re.M)
_EXIT = re.compile(r"\[exit code (-?\d+)\]\s*$")

Step = Generator[dict[str, Any], str, None]  # yields tool calls, receives observations
Frames = list[tuple[str, int]]  # traceback frames outside the tests: (path, line)


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": json.dumps(arguments)}


def _exit_code(observation: str) -> int | None:
    match = _EXIT.search(observation)
    return int(match.group(1)) if match else None


def _read_lines(path: str, lo: int, hi: int) -> str:
    """Keep a pristine copy of ``path`` (for the patch), show lines lo..hi numbered as CWM's
    edit tool numbers them (``%6d\\t``)."""
    quoted, copy = shlex.quote(path), shlex.quote(f".cwm/orig/{path}")
    return (f"mkdir -p \"$(dirname {copy})\" && {{ [ -e {copy} ] || cp {quoted} {copy}; }} && "
            f"awk 'NR>={lo} && NR<={hi} {{printf \"%6d\\t%s\\n\", NR, $0}}' {quoted}")


def _write_patch(paths: list[str]) -> str:
    """A bash command writing the git-diff-format patch of ``paths`` against their pristine
    copies to :data:`PATCH`."""
    script = (
        "import difflib, pathlib, sys\n"
        f"for path in {paths!r}:\n"
        "    a = pathlib.Path('.cwm/orig', path).read_text().splitlines(True)\n"
        "    b = pathlib.Path(path).read_text().splitlines(True)\n"
        "    if a != b:\n"
        "        sys.stdout.write(f'diff --git a/{path} b/{path}\\n')\n"
        "        sys.stdout.writelines(difflib.unified_diff(a, b, f'a/{path}', f'b/{path}'))\n")
    return f"python - > {PATCH} <<'EOF'\n{script}EOF"


KINDS = ("replaced", "swapped", "reordered", "added 'not'", "added 'return'", "added unary")


def _kind(description: str) -> int:
    """How plausible a kind of repair is, as a rank (0 first)."""
    return next((i for i, prefix in enumerate(KINDS) if description.startswith(prefix)), len(KINDS))


def _is_test_path(path: str) -> bool:
    from cwm_forager.pytest_plugin import is_test_file  # noqa: PLC0415 (it imports pytest)

    return is_test_file(path)


class SearchRepairPolicy:
    """See the module docstring. ``max_lines`` and ``max_functions`` bound how many suspicious
    lines (in how many functions) it tries, breadth first; ``max_repairs`` how many of the
    repair helper's suggestions;
    its test runs are wrapped in ``timeout test_timeout`` (a candidate may loop forever)."""

    name = "search"

    def __init__(self, max_lines: int = 12, max_functions: int = 3, test_timeout: int = 20,
                 max_repairs: int = 6) -> None:
        self.max_lines = max_lines
        self.max_repairs = max_repairs
        self.max_functions = max_functions
        self.test_timeout = test_timeout
        self._plan: Step | None = None
        self._seen = 0

    def act(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> Action:
        if self._plan is None or not any(m["role"] == "assistant" for m in messages):
            self._plan = self._episode(messages[1]["content"])
            self._seen = 0  # call ids restart with every episode (same task → same record)
            call = next(self._plan)
        else:
            observation = next((m["content"] for m in reversed(messages)
                                if m["role"] == "tool"), "")
            try:
                call = self._plan.send(observation)
            except StopIteration:   # the plan is over (a submission was refused): say so
                return Action({"role": "assistant", "content": "I could not submit a fix."})
        self._seen += 1
        return Action({"role": "assistant", "content": "",
                       "tool_calls": [{"id": f"call_{self._seen}", "type": "function",
                                       "function": call}]})

    # ------------------------------------------------------------------ the plan

    def _episode(self, statement: str) -> Step:
        """The whole plan: localise, view the suspicious functions, try candidate edits until
        the failing tests and then the regression run pass, submit; else leave the code as it
        was found."""
        failing = _TEST_ID.findall(statement)
        if not failing:
            return
        files = sorted({t.split("::", 1)[0] for t in failing})
        rows, frames = yield from self._localise(failing, files)
        ranked = self._rank(rows, frames)[: self.max_lines]
        fixed = yield from self._evidence_repairs(failing, files, frames, ranked)
        if fixed:
            return
        functions = list(dict.fromkeys((path, lo, hi) for path, _, lo, hi in ranked))
        functions = functions[: self.max_functions]
        # The files as the policy believes they are: original lines it viewed, and its own edits.
        original: dict[str, dict[int, str]] = {}
        current: dict[str, dict[int, str]] = {}
        for path, lo, hi in functions:
            observation = yield _call("bash", command=_read_lines(path, lo, hi))
            for m in filter(None, map(_VIEW_LINE.match, observation.splitlines())):
                original.setdefault(path, {}).setdefault(int(m.group(1)), m.group(2))
                current.setdefault(path, {}).setdefault(int(m.group(1)), m.group(2))
        for path, candidate in self._queue(ranked, functions, original):
            desired = dict(original[path])
            desired.update(zip(range(candidate[1], candidate[2] + 1), candidate[3].split("\n")))
            ok = yield from self._move(path, current[path], desired)
            if ok and (yield from self._passes(failing, files)):
                yield _call("bash", command=_write_patch(sorted(current)))
                yield _call("submit", path=PATCH)
                return
        for path in current:  # nothing worked: leave the code as it was found
            yield from self._move(path, current[path], original[path])

    def _evidence_repairs(self, failing: list[str], files: list[str], frames: Frames,
                          ranked: list[tuple[str, int, int, int]]
                          ) -> Generator[dict[str, Any], str, bool]:
        """Ask the repair helper (``python -m cwm_forager.repair``) what the failing run's
        evidence suggests, at the traceback's frames (deepest first) and the suspicious lines;
        try each suggested edit, from a pristine file each time; submit the first that passes.
        Returns whether it submitted."""
        places = [f"{path}:{line}" for path, line in reversed(frames)]
        functions = {(path, lo, hi): f"{path}:{line}" for path, line, lo, hi in reversed(ranked)}
        places += list(reversed(functions.values()))[:6]  # one line per function, best first
        command = f"python -m cwm_forager.repair {FAILURE} --max {self.max_repairs} " + " ".join(
            f"--at {shlex.quote(p)}" for p in dict.fromkeys(places))
        observation = yield _call("bash", command=command)
        suggestions = []
        for row in observation.splitlines():
            try:
                item = json.loads(row)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict) and {"path", "search", "replace"} <= set(item):
                suggestions.append(item)
        saved: set[str] = set()
        for item in suggestions:
            path = item["path"]
            if path not in saved:  # a pristine copy, for the patch and to undo a wrong edit
                yield _call("bash", command=_read_lines(path, 1, 0))
                saved.add(path)
            observation = yield _call("edit", path=path, search=item["search"],
                                      replace=item["replace"])
            if "has been successfully updated" not in observation:
                continue
            if (yield from self._passes(failing, files)):
                yield _call("bash", command=_write_patch(sorted(saved)))
                yield _call("submit", path=PATCH)
                return True
            copy = shlex.quote(f".cwm/orig/{path}")
            yield _call("bash", command=f"cp {copy} {shlex.quote(path)}")
        return False

    def _pytest(self, targets: list[str]) -> str:
        return (f"timeout {self.test_timeout} python -m pytest -q --tb=short "
                + " ".join(shlex.quote(t) for t in targets))

    def _localise(self, failing: list[str], files: list[str]
                  ) -> Generator[dict[str, Any], str, tuple[list[re.Match], Frames]]:
        """Run the failing tests (traceback frames outside the tests), then the test files with
        line coverage for the Ochiai ranking (or, when nothing ran far enough for a spectrum,
        locate the traceback's lines); returns (sbfl rows, frames)."""
        observation = yield _call("bash", command=f"mkdir -p .cwm && set -o pipefail && "
                                  f"{self._pytest(failing)} 2>&1 | tee {FAILURE}")
        frames = [(m["path"], int(m["line"])) for m in _FRAME.finditer(observation)
                  if not _is_test_path(m["path"])]
        spectrum = (f"CWM_TRACE=. CWM_REPORT=/tmp/spectrum.jsonl timeout {self.test_timeout} "
                    "python -m pytest -q -p cwm_forager.pytest_plugin "
                    + " ".join(shlex.quote(f) for f in files)
                    + " > /dev/null 2>&1; python -m cwm_forager.sbfl /tmp/spectrum.jsonl --top 20")
        observation = yield _call("bash", command=spectrum)
        rows = [m for m in map(ROW.match, observation.splitlines()) if m]
        if not rows and frames:
            places = " ".join(shlex.quote(f"{p}:{n}") for p, n in dict.fromkeys(frames))
            observation = yield _call("bash",
                                      command=f"python -m cwm_forager.sbfl --locate {places}")
            rows = [m for m in map(ROW.match, observation.splitlines()) if m]
        return rows, frames

    def _queue(self, ranked: list[tuple[str, int, int, int]],
               functions: list[tuple[str, int, int]], original: dict[str, dict[int, str]]
               ) -> list[tuple[str, tuple[str, int, int, str]]]:
        """(path, candidate) to try, most plausible kind of repair first (operators, then swaps
        ...); within a kind breadth first: every suspicious line's first candidate before any
        line's second."""
        queue = []
        for rank, (path, line, lo, hi) in enumerate(ranked):
            if (path, lo, hi) not in functions:
                continue
            viewed = original.get(path, {})
            function = {i: viewed[i] for i in range(lo, hi + 1) if i in viewed}
            seen_kinds: dict[int, int] = {}
            for candidate in self._candidates(function, lo, hi, line):
                kind = _kind(candidate[0])
                k = seen_kinds[kind] = seen_kinds.get(kind, -1) + 1
                queue.append(((kind, k, rank), (path, candidate)))
        return [item for _, item in sorted(queue, key=lambda q: q[0])]

    def _passes(self, failing: list[str], files: list[str]
                ) -> Generator[dict[str, Any], str, bool]:
        """The failing tests pass now, and then so do their whole files (no regression)."""
        observation = yield _call("bash", command=self._pytest(failing))
        if _exit_code(observation) != 0:
            return False
        observation = yield _call("bash", command=self._pytest(files))
        return _exit_code(observation) == 0

    def _move(self, path: str, current: dict[int, str], desired: dict[int, str]
              ) -> Generator[dict[str, Any], str, bool]:
        """One SEARCH/REPLACE taking the file's lines from ``current`` to ``desired`` (reverting
        an earlier candidate and applying the next in the same edit when they are close),
        widened with neighbouring lines when the SEARCH is not unique. Updates ``current``."""
        changed = sorted(i for i in desired if current.get(i) != desired[i])
        if not changed:
            return True
        first, last = changed[0], changed[-1]
        if last - first > 8:  # far apart: two edits
            middle = {i: (desired[i] if i <= first + 8 else current[i]) for i in current}
            ok = yield from self._move(path, current, middle)
            return ok and (yield from self._move(path, current, desired))
        for context in (0, 1, 3):
            lines = [i for i in range(first - context, last + context + 1) if i in current]
            search = "\n".join(current[i] for i in lines)
            replace = "\n".join(desired.get(i, current[i]) for i in lines)
            observation = yield _call("edit", path=path, search=search, replace=replace)
            if "has been successfully updated" in observation:
                current.update({i: desired.get(i, current[i]) for i in lines})
                return True
            if "did not appear verbatim" in observation:
                return False
        return False

    @staticmethod
    def _rank(rows: list[re.Match], frames: Frames) -> list[tuple[str, int, int, int]]:
        """Suspicious lines, best first: Ochiai score, then lines on the traceback (deepest
        frame first), then closeness to a traceback line of the same file (bugs tend to sit
        just before where they surface), then the order sbfl printed them in."""
        depth = {frame: i for i, frame in enumerate(frames)}
        scored = []
        for order, m in enumerate(rows):
            key = (m["path"], int(m["line"]))
            near = min((abs(line - key[1]) for path, line in frames if path == key[0]),
                       default=10**6)
            scored.append((-round(float(m["score"]), 3), -depth.get(key, -1), near, order,
                           (m["path"], int(m["line"]), int(m["lo"]), int(m["hi"]))))
        return [item[-1] for item in sorted(scored)]

    @staticmethod
    def _candidates(source: dict[int, str], lo: int, hi: int, line: int
                    ) -> list[tuple[str, int, int, str]]:
        """(description, first line, last line, replacement lines) for one suspicious line,
        computed on the viewed function's text."""
        numbers = [i for i in range(lo, hi + 1) if i in source]
        if line not in source or not numbers:
            return []
        text = "\n".join(source[i] for i in numbers) + "\n"
        snippet = textwrap.dedent(text)
        pad = text.splitlines()[0][: len(text.splitlines()[0]) - len(snippet.splitlines()[0])]
        try:
            candidates = line_candidates(snippet, line - numbers[0] + 1)
        except SyntaxError:
            return []
        old_lines = snippet.splitlines()
        out = []
        for description, new in candidates:
            new_lines = new.splitlines()
            if len(new_lines) != len(old_lines):
                continue
            changed = [i for i, (a, b) in enumerate(zip(old_lines, new_lines)) if a != b]
            if not changed:
                continue
            first, last = changed[0], changed[-1]
            block = "\n".join(pad + row if row else row for row in new_lines[first : last + 1])
            out.append((description, numbers[0] + first, numbers[0] + last, block))
        return out


class OpenAIPolicy:
    """A chat model behind an OpenAI-compatible endpoint, acting through tool calls."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 temperature: float = 0.7, max_tokens: int = 2048, timeout: float = 120.0) -> None:
        from openai import OpenAI  # noqa: PLC0415 (a heavy client only this policy needs)

        self.client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout,
                             max_retries=2)
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.name = f"openai:{model}"

    def act(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> Action:
        response = self.client.chat.completions.create(  # type: ignore[call-overload]
            model=self.model, messages=list(messages), tools=list(tools), tool_choice="auto",
            temperature=self.temperature, max_tokens=self.max_tokens)
        if not response.choices:
            raise RuntimeError(f"{self.name}: the endpoint returned no choices")
        reply = response.choices[0].message
        message: dict[str, Any] = {"role": "assistant", "content": reply.content or ""}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in reply.tool_calls]
        usage = response.usage
        return Action(message, usage.prompt_tokens if usage else None,
                      usage.completion_tokens if usage else None)


def make_policy(spec: dict[str, Any], api_key: str | None = None) -> Any:
    """From a ``PolicySpec`` dict (camelCase or snake_case keys)."""
    kind = spec.get("kind", "search")
    if kind == "search":
        return SearchRepairPolicy()
    if kind == "openai":
        endpoint, model = spec.get("endpoint"), spec.get("model")
        if not endpoint or not model:
            raise ValueError("policy: endpoint and model are required for kind 'openai'")
        return OpenAIPolicy(endpoint, model, api_key,
                            temperature=float(spec.get("temperature", 0.7)))
    raise ValueError(f"policy.kind {kind!r}: choose search or openai")
