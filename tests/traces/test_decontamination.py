"""The data steps leave the evaluation's programs out: the trace step the held-out CRUXEval
problems (and any program with their hash), the trajectory step the functions of its held-out
mutate-fix tasks."""

from __future__ import annotations

import json

from apache_beam import pvalue

from cwm_beam import traces
from cwm_beam.sources import cruxeval_split
from cwm_beam.trajectories import select_for_repository, task_program
from cwm_forager.tasks import Task
from cwm_spec.artifacts import iter_records, read_manifest
from cwm_spec.programs import program_hash

MODULE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
          "def mul(a, b):\n    return a * b\n")


def test_held_out_cruxeval_problems_are_never_traced(tmp_path):
    held = cruxeval_split(795)
    # A jsonl source repeating one held-out program (another input): dropped by its hash too.
    copy = held.evaluation[0]
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"id": "copy", "code": copy["code"], "input": copy["input"]})
                     + "\n" + json.dumps({"id": "own", "code": "def f(x):\n    return x * 3",
                                          "input": "2"}) + "\n")
    out = tmp_path / "out"
    stats = traces.run(["--source", "cruxeval", "--source", f"jsonl:{extra}",
                        "--cruxeval-held-out", "795", "--output", str(out), "--workers", "1"])
    assert stats["excluded_for_evaluation"] == {"cruxeval": 795, "jsonl": 1}
    records = [r for split in ("train", "validation") for r in iter_records(str(out), split)]
    traced = {r["id"] for r in records}
    assert traced == {f"cruxeval/{r['id']}" for r in held.trainable} | {"jsonl/own"}
    banned = {program_hash(r["code"]) for r in held.evaluation}
    manifest = read_manifest(str(out))
    listed = set(manifest.programs["train"]) | set(manifest.programs["validation"])
    assert listed == {program_hash(r["code"]) for r in records} and not listed & banned


def task(family: str, function: str, key: str) -> Task:
    return Task(task_id=f"calc/{family}/{key}", repo="calc", family=family, path="calc/m.py",
                function=function, line=2, description=f"{family} in {function}",
                original=MODULE, mutated=MODULE, tests=("tests/test_m.py::t",))


def test_training_tasks_skip_the_functions_of_held_out_tasks():
    families = ("body_removal", "operator_replacement")
    tasks = [task("body_removal", "add", "a1"), task("operator_replacement", "add", "a2"),
             task("body_removal", "sub", "s1"), task("operator_replacement", "mul", "m1"),
             task("operator_replacement", "sub", "s2")]
    items = [{"repository": {"path": "calc"}, "task": t.to_json()} for t in tasks]
    out = list(select_for_repository(("calc", items), families, n=5, held_out=1))
    held = [o.value for o in out if isinstance(o, pvalue.TaggedOutput) and o.tag == "heldout"]
    left = [o.value for o in out if isinstance(o, pvalue.TaggedOutput) and o.tag == "excluded"]
    chosen = [o for o in out if not isinstance(o, pvalue.TaggedOutput)]
    assert [h["id"] for h in held] == ["calc/body_removal/a1"]   # held out first
    assert left == ["calc"]                                       # a2 mutates add as well
    functions = {o["task"]["function"] for o in chosen}
    assert functions == {"sub", "mul"} and len(chosen) == 3
    assert task_program(held[0]["task"]) not in {task_program(o["task"]) for o in chosen}
