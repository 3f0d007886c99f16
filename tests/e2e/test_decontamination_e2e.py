"""examples/tiny.yaml's data, built by its own plan's data steps, holds no evaluation program in any
training shard: read back from the shard files themselves, not from what the manifests claim.

The evaluation's programs are recomputed here the way the evaluation chooses them: the CRUXEval
problems ``spec.evaluation.cruxevalHeldOut`` holds out, the traces' validation split (held-out
traces and programs) and the trajectories' ``eval_tasks`` (held-out mutate-fix tasks). Then every
``train-*`` shard on disk is read: trace records by their code's program hash, trajectories by
their task's program (its function's original source), the code corpus and the rehearsal text by
whether any evaluation program's text occurs in them. The evaluation's own check
(``cwm_jobs.evaluate.check_decontamination``) must pass on this data and refuse a training list
that holds one evaluation program.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cwm_beam.sources import cruxeval_split
from cwm_spec.api import CWMPipeline
from cwm_spec.artifacts import read_manifest, verify
from cwm_spec.plan import Target, build_plan
from cwm_spec.programs import ContaminationError, function_source, program_hash, task_program_hash

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DATA_STEPS = ("traces", "trajectories", "corpus")


def normal(code: str) -> str:
    """Program text as program_hash sees it (trailing spaces and blank edges ignored)."""
    return "\n".join(line.rstrip() for line in code.strip().splitlines())


def shard_records(folder: Path, split: str) -> list[dict[str, Any]]:
    """Every record of every ``SPLIT-*.jsonl`` file under the data set's folder (parts too)."""
    records = []
    for path in sorted(folder.rglob(f"{split}-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[CWMPipeline, dict[str, Path]]:
    """The data steps of examples/tiny.yaml's plan, run as the runner runs them."""
    pipeline = CWMPipeline.model_validate(yaml.safe_load((REPO / "examples/tiny.yaml").read_text()))
    root = tmp_path_factory.mktemp("tiny-data")
    plan = build_plan(pipeline, Target.local(str(root)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in DATA_STEPS:
        step = plan.step(name)
        done = subprocess.run(list(step.command), env={**env, **step.env}, capture_output=True,
                              text=True, timeout=1200)
        assert done.returncode == 0, f"{name}:\n{done.stderr[-4000:]}"
    outputs = {name: Path(plan.step(name).outputs["dataset"]) for name in DATA_STEPS}
    outputs["rehearsal"] = Path(plan.step("corpus").outputs["rehearsal"])
    for folder in outputs.values():
        verify(str(folder))
    return pipeline, outputs


def evaluation_programs(pipeline: CWMPipeline, data: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Each evaluation's programs, hash -> text."""
    held = cruxeval_split(pipeline.spec.evaluation.cruxeval_held_out).evaluation
    tasks = [r["task"] for r in shard_records(data["trajectories"], "eval_tasks")]
    return {
        "cruxeval": {program_hash(r["code"]): r["code"] for r in held},
        "held-out traces": {program_hash(r["code"]): r["code"]
                            for r in shard_records(data["traces"], "validation")},
        "mutate-fix": {task_program_hash(t["original"], t["path"], t["function"]): t["function"]
                       for t in tasks},
    }


def test_no_evaluation_program_is_in_any_training_shard(tiny_data):
    pipeline, data = tiny_data
    evaluation = evaluation_programs(pipeline, data)
    assert len(evaluation["cruxeval"]) == 400
    assert evaluation["held-out traces"] and evaluation["mutate-fix"], evaluation
    banned = {h for programs in evaluation.values() for h in programs}

    traces = shard_records(data["traces"], "train")
    trained = {program_hash(r["code"]) for r in traces}
    assert len(trained) > 1000 and not trained & banned
    assert {r["source"] for r in traces} == {"cruxeval", "synthetic"}  # the trainable 400 too

    trajectories = shard_records(data["trajectories"], "train")
    tasks = {task_program_hash(r["task"]["original"], r["task"]["path"], r["task"]["function"])
             for r in trajectories}
    assert trajectories and not tasks & banned
    # nor does a training episode show a held-out function's original body (the search policy
    # views suspicious functions: a held-out one viewed while fixing another would leak it)
    for t in (r["task"] for r in shard_records(data["trajectories"], "eval_tasks")):
        body = "\n".join(function_source(t["original"], t["function"]).splitlines()[1:]).strip()
        shown = [r["id"] for r in trajectories
                 if any(body in str(m.get("content") or "") for m in r["messages"])]
        assert not shown, (t["task_id"], shown)

    # Code and text: no CRUXEval evaluation program's text inside any corpus file or section.
    texts = [normal(code) for code in evaluation["cruxeval"].values()]
    for name in ("corpus", "rehearsal"):
        for record in shard_records(data[name], "train"):
            body = normal(record["text"])
            assert not any(t in body for t in texts), (name, record.get("path"))

    # What the manifests list is what the shards hold, and what the steps say they left out.
    assert set(read_manifest(str(data["traces"])).programs["train"]) == trained
    assert set(read_manifest(str(data["trajectories"])).programs["train"]) == tasks
    stats = read_manifest(str(data["traces"])).stats
    assert stats["excluded_for_evaluation"] == {"cruxeval": 400}


def test_the_evaluation_checks_the_same_lists_and_refuses_an_overlap(tiny_data):
    from cwm_jobs.evaluate import check_decontamination

    pipeline, data = tiny_data
    evaluation = {k: sorted(v) for k, v in evaluation_programs(pipeline, data).items()}
    training = {name: str(data[name]) for name in ("traces", "trajectories")}
    counts = check_decontamination(evaluation, training)
    assert counts["decontamination_unchecked"] == 0
    assert counts["decontamination_programs"] == len({h for v in evaluation.values() for h in v})
    # One training program made an evaluation program: refused, naming the data set.
    trained = read_manifest(str(data["traces"])).programs["train"][0]
    with pytest.raises(ContaminationError, match=r"held-out traces: 1 of \d+ programs in "
                                                 r"traces/train"):
        check_decontamination({**evaluation, "held-out traces": [trained]}, training)


def test_rehearsal_is_text_of_its_own(tiny_data):
    _, data = tiny_data
    manifest = read_manifest(str(data["rehearsal"]))
    assert manifest.kind == "text" and manifest.records("train") > 50
    assert manifest.records("validation") >= 1
    corpus_paths = {r["path"] for r in shard_records(data["corpus"], "train")}
    assert not any("pydoc_data" in p or "fixture_repos" in p for p in corpus_paths)
