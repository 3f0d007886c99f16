"""Verified rewards: a model's answer counts only if running it says so.

Answers are untrusted code (``eval`` of model output), so they are checked in
:mod:`cwm_exec.sandbox` with its time, memory, process and output limits: one sandboxed Python
process per batch evaluates every ``(predicted, expected)`` pair, each under its own CPU alarm.
If the batch as a whole fails (a pathological answer exhausting memory, say), every pair is
re-checked in a process of its own, so one bad answer costs only itself.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from cwm_exec.sandbox import Limits, run_command

LOG = logging.getLogger("cwm_jobs.rewards")

# Runs inside the sandbox: reads [[predicted, expected], ...] on stdin, prints [true/false, ...].
CHECKER = r"""
import json, signal, sys
def _alarm(*_):
    raise TimeoutError("answer took too long")
signal.signal(signal.SIGALRM, _alarm)
# Answers are literals: no builtins beyond the names literal reprs use (the sandbox is the wall;
# this only keeps "the answer" from being a program).
NAMES = {"__builtins__": {}, "set": set, "frozenset": frozenset, "inf": float("inf"),
         "nan": float("nan")}
out = []
for predicted, expected in json.loads(sys.stdin.read()):
    ok = False
    try:
        signal.setitimer(signal.ITIMER_REAL, PER_ITEM)
        ok = bool(eval(predicted, dict(NAMES)) == eval(expected, dict(NAMES)))
    except BaseException:
        ok = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    out.append(ok)
sys.stdout.write("\n" + json.dumps(out))
"""


def _limits(spec: Mapping[str, Any] | None, items: int) -> Limits:
    base = Limits.from_spec(spec)
    wall = min(base.wall_seconds * max(1, items), max(base.wall_seconds, 30.0))
    return Limits(wall_seconds=wall, cpu_seconds=wall, memory_mb=base.memory_mb,
                  output_bytes=max(base.output_bytes, 64 * items + 1024), processes=base.processes)


def _run(pairs: Sequence[tuple[str, str]], spec: Mapping[str, Any] | None, per_item: float) -> list[bool] | None:
    with tempfile.TemporaryDirectory(prefix="cwm-reward-") as cwd:
        result = run_command(
            [sys.executable, "-I", "-c", CHECKER.replace("PER_ITEM", repr(per_item))],
            cwd=cwd, limits=_limits(spec, len(pairs)), stdin=json.dumps(pairs).encode(),
        )
    if result.returncode != 0 or result.reason:
        return None
    try:
        verdicts = json.loads(result.stdout.decode(errors="replace").rsplit("\n", 1)[-1])
    except json.JSONDecodeError:
        return None
    if not isinstance(verdicts, list) or len(verdicts) != len(pairs):
        return None
    return [v is True for v in verdicts]


def check_outputs(pairs: Sequence[tuple[str, str]], sandbox: Mapping[str, Any] | None = None,
                  per_item_seconds: float = 2.0) -> list[bool]:
    """Whether each predicted literal evaluates equal to the expected one (in the sandbox).
    Empty predictions are wrong without running anything."""
    verdicts = [False] * len(pairs)
    todo = [i for i, (p, _) in enumerate(pairs) if p.strip()]
    if not todo:
        return verdicts
    batch = _run([pairs[i] for i in todo], sandbox, per_item_seconds)
    if batch is None:
        LOG.warning("reward batch of %d failed in the sandbox; checking one by one", len(todo))
        batch = [bool((_run([pairs[i]], sandbox, per_item_seconds) or [False])[0]) for i in todo]
    for i, ok in zip(todo, batch):
        verdicts[i] = ok
    return verdicts
