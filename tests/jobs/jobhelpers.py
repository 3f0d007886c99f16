"""Helpers for the training-stage tests: fixture data sets and step configurations."""

from __future__ import annotations

import json
from pathlib import Path

from cwm_spec.artifacts import Manifest, write_manifest, write_shard
from cwm_spec.programs import program_hash


def write_dataset(uri: Path, kind: str, splits: dict[str, list[dict]], shards: int = 2) -> str:
    """A data set as the steps write it, with its program lists when its records hold code."""
    manifest = Manifest(kind=kind)
    manifest.programs = {split: [program_hash(r["code"]) for r in records if "code" in r]
                         for split, records in splits.items()
                         if any("code" in r for r in records)}
    for split, records in splits.items():
        n = max(1, min(shards, len(records)))
        for i in range(n):
            manifest.splits.setdefault(split, []).append(
                write_shard(str(uri), f"{split}-{i:05d}-of-{n:05d}.jsonl", records[i::n]))
    write_manifest(str(uri), manifest)
    return str(uri)


def traced_records(programs: list[tuple[str, str]]) -> list[dict]:
    """Trace our own (trusted, bundled) programs in this process: the tracer under test is the
    trace engineer's; here it only produces realistic fixture data."""
    from cwm_exec.tracer import TraceLimits, trace_function

    records = []
    for source, args in programs:
        result = trace_function(source, "f", args, limits=TraceLimits(max_events=200))
        if result.truncated_reason is None:
            records.append({"text": result.text, "return_repr": result.return_repr,
                            "code": source, "frames": [f.to_json() for f in result.frames]})
    return records


def trajectory_records(count: int) -> list[dict]:
    """ForagerAgent-shaped episodes (OpenAI messages with tool calls and tool outputs)."""
    records = []
    for i in range(count):
        call = {"id": f"c{i}", "type": "function",
                "function": {"name": "bash", "arguments": json.dumps({"command": f"pytest -q tests/test_{i}.py"})}}
        records.append({"messages": [
            {"role": "system", "content": "You fix bugs in the repository."},
            {"role": "user", "content": f"The test tests/test_{i}.py fails. Fix the bug."},
            {"role": "assistant", "content": "Let me run the failing test.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{i}",
             "content": f"F\nAssertionError: add({i}, 1) != {i + 1}\n1 failed"},
            {"role": "assistant", "content": f"The operator in add is wrong; I replace `-` with `+` (case {i})."},
        ], "meta": {"repo": "calc", "task": i}})
    return records


def stage_config(out: Path, stage: str, inputs: dict, *, spec: dict | None = None,
                 init: str | None = None, evaluation: dict | None = None) -> Path:
    """Write a step configuration like the plan's for ``stage`` under ``out``; return its path."""
    base = {"name": stage, "steps": 4, "microBatchSize": 2, "sequenceLength": 64,
            "learningRate": 3e-3, "minLearningRate": 3e-4, "warmupSteps": 1, "zeroStage": 2,
            "checkpointEvery": 2}
    base.update(spec or {})
    config = {
        "apiVersion": "cwm.dev/v1alpha1", "pipeline": "test", "step": stage, "kind": "train",
        "seed": 0, "spec": base, "model": {"preset": "debug", "overrides": {}},
        "evaluation": {"heldOutTraces": 6, "cruxeval": True, "cruxevalLimit": 4,
                       "cruxevalHeldOut": 400,
                       "maxNewTokens": 6, "reasoningTokens": 12, **(evaluation or {})},
        "sandbox": {"wallSeconds": 10, "cpuSeconds": 10, "memoryMB": 1024},
        "inputs": {k: inputs[k] for k in ("tokenizer", "traces", "trajectories", "corpus",
                                          "rehearsal") if k in inputs},
        "outputs": {"checkpoint": str(out / stage / "checkpoint"), "state": str(out / stage / "state"),
                    "metrics": str(out / stage / "metrics")},
    }
    if init:
        config["inputs"]["init"] = init
    path = out / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    """The environment for a stage launched as a child process: one intra-op thread, and none of
    the distributed variables this test process exported for its own in-process group (a child
    would take them for torchrun's and join the parent's port)."""
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in DIST_VARIABLES and not k.startswith("PET_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env
