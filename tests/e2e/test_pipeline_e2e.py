"""End to end: a smaller variant of examples/tiny.yaml through every real step — Beam traces
and trajectories, corpus, tokenizer, DeepSpeed pretrain → midtrain → SFT → RL — with `cwm run`
as a user runs it; then the report, the neural debugger on the final checkpoint, and stage
caching (an unchanged rerun does nothing; changing SFT reruns SFT and RL only)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.e2e.small import cwm, run_pipeline, small_data, small_pipeline, small_rl, step_status

pytestmark = pytest.mark.slow

STAGE = {"microBatchSize": 2, "sequenceLength": 128, "warmupSteps": 1, "checkpointEvery": 2,
         "learningRate": 1e-3}
MANIFEST = small_pipeline(
    "e2e", sample_records=300, data=small_data(60, corpus_files=200),
    stages=[{"name": "pretrain", "steps": 4, **STAGE},
            {"name": "midtrain", "steps": 4, **STAGE},
            {"name": "sft", "steps": 3, **STAGE},
            small_rl(steps=2, learning_rate=1e-4)],
    evaluation={"heldOutTraces": 4, "cruxevalLimit": 4, "maxNewTokens": 8,
                "reasoningTokens": 16, "mutateFixTasks": 1, "mutateFixTurns": 2})
ALL = ["traces", "trajectories", "corpus", "tokenizer", "pretrain", "midtrain", "sft", "rl"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pipeline(tmp_path_factory.mktemp("e2e"), MANIFEST)


def test_every_step_succeeds_with_metrics(run):
    _, workdir = run
    steps = step_status(workdir)
    assert list(steps) == ALL
    assert {s["state"] for s in steps.values()} == {"Succeeded"}
    for stage in ("pretrain", "midtrain", "sft", "rl"):
        metrics = steps[stage]["metrics"]
        assert "cruxeval_o_direct" in metrics and "trace_step_exact_match" in metrics, \
            (stage, metrics)
        assert ("cruxeval_o_reasoning" in metrics) == (stage in ("sft", "rl")), (stage, metrics)
        assert metrics["decontamination_unchecked"] == 0, (stage, metrics)
        if stage != "rl":
            assert "validation_loss" in metrics, (stage, metrics)
    assert "rl_heldout_accuracy" in steps["rl"]["metrics"]
    for stage in ("sft", "rl"):  # the model as the agent on held-out mutate-fix tasks
        assert steps[stage]["metrics"]["mutate_fix_tasks"] == 1, steps[stage]["metrics"]
        assert 0.0 <= steps[stage]["metrics"]["mutate_fix_solve_rate"] <= 1.0
    for data in ("traces", "trajectories"):
        manifest = json.loads((workdir / "artifacts" / data / "dataset/manifest.json").read_text())
        assert sum(s["records"] for s in manifest["splits"]["train"]) > 0


def test_report_is_written_with_plots(run):
    _, workdir = run
    report = (workdir / "report/report.md").read_text()
    assert "## Training loss" in report and "## Evaluation" in report
    assert (workdir / "report/loss.png").stat().st_size > 1000


def test_neural_debugger_on_the_final_checkpoint(run, tmp_path):
    _, workdir = run
    program = tmp_path / "prog.py"
    program.write_text("def f(n):\n    total = 0\n    for i in range(n):\n        total += i\n"
                       "    return total\n")
    result = cwm("debug", str(workdir / "artifacts/rl/checkpoint"), f"{program}:f",
                 "--args", "3", "--real", "--commands", "s;p total;n;o;r;q", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "   0  model: call      def f(n):" in result.stdout
    assert "real:" in result.stdout


def test_unchanged_rerun_is_all_cached_and_sft_change_reruns_sft_and_rl(run):
    manifest, workdir = run
    result = cwm("run", str(manifest), "--workdir", str(workdir), "--plain")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {s["state"] for s in step_status(workdir).values()} == {"Cached"}

    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["stages"][2]["learningRate"] = 5e-4
    manifest.write_text(yaml.safe_dump(doc))
    result = cwm("run", str(manifest), "--workdir", str(workdir), "--plain")
    assert result.returncode == 0, result.stderr[-3000:]
    states = {name: s["state"] for name, s in step_status(workdir).items()}
    assert states == {**dict.fromkeys(ALL[:6], "Cached"), "sft": "Succeeded", "rl": "Succeeded"}
    assert "| sft | Succeeded |" in (workdir / "report/report.md").read_text()
