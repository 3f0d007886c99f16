"""What the end-to-end tests share: `cwm` as a user runs it, and a small data section (the real
steps on a few programs, one fixture repository's tasks, a slice of the installed sources)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

CWM = [sys.executable, "-m", "cwm_operator.cli"]


def cwm(*args: str, env: dict[str, str] | None = None,
        timeout: float = 1200) -> subprocess.CompletedProcess:
    """`python -m cwm_operator.cli ARGS`, one thread per torch process (the steps run one at a
    time on a 2-core machine), text output captured."""
    return subprocess.run([*CWM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def run_pipeline(root: Path, manifest: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``manifest`` to ``root/pipeline.yaml`` and `cwm run` it into ``root/run`` (plain
    output), which must succeed: (manifest file, workdir)."""
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(manifest))
    workdir = root / "run"
    result = cwm("run", str(path), "--workdir", str(workdir), "--plain")
    assert result.returncode == 0, result.stderr[-5000:]
    return path, workdir


def step_status(workdir: Path) -> dict[str, dict[str, Any]]:
    """`cwm status --json` of a run: each step's entry by name, in the plan's order."""
    result = cwm("status", str(workdir), "--json")
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in json.loads(result.stdout)["steps"]}


def small_pipeline(name: str, *, data: dict[str, Any], stages: list[dict[str, Any]],
                   evaluation: dict[str, Any], sample_records: int = 200) -> dict[str, Any]:
    """A CWMPipeline manifest on the debug model with a 512-token tokenizer."""
    return {"apiVersion": "cwm.dev/v1alpha1", "kind": "CWMPipeline", "metadata": {"name": name},
            "spec": {"model": {"preset": "debug"},
                     "tokenizer": {"vocabSize": 512, "sampleRecords": sample_records},
                     "data": data, "stages": stages, "evaluation": evaluation}}


def small_rl(steps: int, learning_rate: float) -> dict[str, Any]:
    """An RL stage on both tasks with groups of two and tiny budgets."""
    return {"name": "rl", "steps": steps, "learningRate": learning_rate, "warmupSteps": 0,
            "rl": {"groupSize": 2, "promptsPerStep": 2, "maxNewTokens": 8, "maxTurns": 2,
                   "tasks": ["output_prediction", "mutate_fix"]}}


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
