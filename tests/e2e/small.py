"""What the end-to-end tests share: `cwm` as a user runs it, and a small data section (the real
steps on a few programs, one fixture repository's tasks, a slice of the installed sources)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

CWM = [sys.executable, "-m", "cwm_operator.cli"]


def cwm(*args: str, env: dict[str, str] | None = None,
        timeout: float = 1200) -> subprocess.CompletedProcess:
    """`python -m cwm_operator.cli ARGS`, one thread per torch process (the steps run one at a
    time on a 2-core machine), text output captured."""
    return subprocess.run([*CWM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def small_data(programs: int, *, trace_shards: int = 1, max_turns: int = 8,
               corpus_files: int = 100) -> dict[str, Any]:
    """spec.data for twice `programs` synthetic programs (no fuzzing: the bundled CRUXEval
    problems are the evaluation's by default), one mutate-fix task per repository (one more held
    out), `corpus_files` source files."""
    return {
        "traces": {"sources": [{"kind": "synthetic", "count": 2 * programs}],
                   "fuzzInputsPerFunction": 0, "shards": trace_shards,
                   "validationFraction": 0.2},
        "trajectories": {"tasksPerRepository": 1, "heldOutTasks": 1,
                         "policy": {"maxTurns": max_turns}, "shards": 1},
        "corpus": {"maxFiles": corpus_files, "maxBytes": corpus_files * 10_000},
        "beam": {"workers": 1},
    }
