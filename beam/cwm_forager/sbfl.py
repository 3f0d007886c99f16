"""Spectrum-based fault localisation (Ochiai), as a command the agent can run in its sandbox.

Input: the per-test JSON lines written by :mod:`cwm_forager.pytest_plugin` with line
coverage on. A line executed by many failing and few passing tests is suspicious:
``ochiai = ef / sqrt((ef + nf) * (ef + ep))`` (ef/ep: failing/passing tests executing the line,
nf: failing tests not executing it). Usage, inside the repository::

    CWM_TRACE=. CWM_REPORT=/tmp/s.jsonl python -m pytest -q -p cwm_forager.pytest_plugin tests/test_x.py
    python -m cwm_forager.sbfl /tmp/s.jsonl --top 15

Prints one suspicious line per row: ``score path:line function first-last``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

from cwm_forager.mutations import function_lines

ROW = re.compile(r"^\s*(?P<score>\d\.\d+)\s+(?P<path>\S+):(?P<line>\d+)\s+(?P<func>\S+)\s+(?P<lo>\d+)-(?P<hi>\d+)\s*$")


def ochiai(records: Iterable[dict]) -> dict[tuple[str, int], float]:
    """Suspiciousness of every executed (file, line)."""
    failing_total = 0
    ef: dict[tuple[str, int], int] = {}
    ep: dict[tuple[str, int], int] = {}
    for record in records:
        failed = record.get("outcome") in ("failed", "error")
        failing_total += failed
        for path, lines in (record.get("lines") or {}).items():
            for line in lines:
                counts = ef if failed else ep
                counts[(path, line)] = counts.get((path, line), 0) + 1
    scores = {}
    for key in set(ef) | set(ep):
        e_f, e_p = ef.get(key, 0), ep.get(key, 0)
        denominator = math.sqrt(failing_total * (e_f + e_p))
        scores[key] = e_f / denominator if denominator else 0.0
    return scores


def ranked(records: list[dict], root: Path, top: int) -> list[tuple[float, str, int, str, int, int]]:
    """Top lines as (score, path, line, enclosing function, its first line, its last line);
    ties broken by file and line (deterministic). Lines outside any function are skipped."""
    rows = []
    funcs: dict[str, dict[str, tuple[int, int]]] = {}
    for (path, line), score in ochiai(records).items():
        if score <= 0:
            continue
        if path not in funcs:
            try:
                funcs[path] = function_lines((root / path).read_text(encoding="utf-8"))
            except (OSError, SyntaxError, UnicodeDecodeError):
                funcs[path] = {}
        # innermost function containing the line (smallest span)
        inside = [(hi - lo, name, lo, hi) for name, (lo, hi) in funcs[path].items() if lo < line <= hi]
        if inside:
            _, name, lo, hi = min(inside)
            rows.append((score, path, line, name, lo, hi))
    rows.sort(key=lambda r: (-round(r[0], 6), r[1], r[2]))
    return rows[:top]


def locate(places: list[str], root: Path) -> list[str]:
    """Rows (score 1.000) for the innermost function around each ``path:line``."""
    rows = []
    for place in places:
        path, _, line_text = place.rpartition(":")
        try:
            line = int(line_text)
            funcs = function_lines((root / path).read_text(encoding="utf-8"))
        except (ValueError, OSError, SyntaxError, UnicodeDecodeError):
            continue
        inside = [(hi - lo, name, lo, hi) for name, (lo, hi) in funcs.items() if lo < line <= hi]
        if inside:
            _, name, lo, hi = min(inside)
            rows.append(f"1.000  {path}:{line}  {name}  {lo}-{hi}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, nargs="?")
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--locate", nargs="*", default=[], metavar="PATH:LINE",
                        help="print the enclosing function of these lines instead (score 1)")
    args = parser.parse_args(argv)
    if args.locate:
        for row in locate(args.locate, args.root):
            print(row)
        return 0
    if args.report is None or not args.report.exists():
        print(f"no spectrum: {args.report} was not written (did the tests run?)")
        return 1
    records = []
    for line in args.report.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    failing = sum(r.get("outcome") in ("failed", "error") for r in records)
    print(f"{len(records)} tests, {failing} failing")
    for score, path, line, name, lo, hi in ranked(records, args.root, args.top):
        print(f"{score:.3f}  {path}:{line}  {name}  {lo}-{hi}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
