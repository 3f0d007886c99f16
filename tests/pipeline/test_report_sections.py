"""The report's data, decontamination and output-prediction sections, from a work directory laid
out as the runner leaves it (records and manifests written here, no step run)."""

from __future__ import annotations

import json
from pathlib import Path

from cwm_operator.report import write_report
from cwm_spec.artifacts import Manifest, Shard, write_manifest

STAGES = {
    "pretrain": {"validation_loss": 7.0, "validation_loss/rehearsal": 7.5, "cruxeval_o_direct": 0.0,
                 "cruxeval_o_problems": 50.0, "decontamination_programs": 140.0,
                 "decontamination_unchecked": 0.0},
    "sft": {"validation_loss": 5.0, "validation_loss/rehearsal": 6.5, "cruxeval_o_direct": 0.1,
            "cruxeval_o_reasoning": 0.2, "cruxeval_o_reasoning_unfinished": 0.3,
            "cruxeval_o_problems": 50.0, "heldout_output_direct": 0.4,
            "heldout_output_reasoning": 0.5, "heldout_output_reasoning_unfinished": 0.25,
            "heldout_output_problems": 50.0, "decontamination_programs": 144.0,
            "decontamination_unchecked": 0.0},
}


def dataset(root: Path, step: str, output: str, kind: str, splits: dict[str, int],
            stats: dict) -> None:
    shards = {name: [Shard(f"{name}-0.jsonl", n, 100 * n, "0")] for name, n in splits.items()}
    write_manifest(str(root / step / output), Manifest(kind, shards, stats))


def test_rehearsal_exclusions_and_both_modes_are_reported(tmp_path):
    artifacts = tmp_path / "artifacts"
    dataset(artifacts, "traces", "dataset", "traces", {"train": 2296, "validation": 104},
            {"excluded_for_evaluation": {"cruxeval": 400}})
    dataset(artifacts, "trajectories", "dataset", "trajectories", {"train": 7, "eval_tasks": 4},
            {"excluded_for_evaluation": {"calc": 3, "textkit": 2}})
    dataset(artifacts, "corpus", "dataset", "code", {"train": 638, "validation": 4}, {})
    dataset(artifacts, "corpus", "rehearsal", "text", {"train": 178, "validation": 12}, {})
    (tmp_path / "run.json").write_text(json.dumps(
        {"pipeline": "tiny", "steps": list(STAGES), "state": "Succeeded",
         "storage": str(artifacts)}))
    for name, metrics in STAGES.items():
        (tmp_path / "steps" / name).mkdir(parents=True)
        (tmp_path / "steps" / name / "state.json").write_text(json.dumps(
            {"name": name, "state": "Succeeded", "seconds": 1.0, "metrics": metrics}))
    report = write_report(tmp_path).read_text()
    assert "| traces | traces | 2296 | 104 | 0 | 400 |" in report
    assert "| trajectories | trajectories | 7 | 4 | 0 | 5 |" in report
    assert "| rehearsal | text | 178 | 12 | 0 |  |" in report
    assert "up to 144 evaluation programs per stage checked" in report
    assert "| pretrain | CRUXEval (held out) | 50 | 0 |  |  |" in report
    assert "| sft | CRUXEval (held out) | 50 | 0.1 | 0.2 | 0.3 |" in report
    assert "| sft | held-out programs | 50 | 0.4 | 0.5 | 0.25 |" in report
    header = next(line for line in report.splitlines() if line.startswith("| stage | valid"))
    assert header.startswith("| stage | validation_loss | validation_loss/rehearsal |")
