"""Acceptance (issue 20): `cwm run` of a pipeline whose ``spec.model.init`` points at a random tiny
CwmForCausalLM checkpoint written by ``transformers`` runs mid-train → SFT → RL from it: the
import step converts it (no tokenizer is trained, no pretraining), every stage uses its
tokenizer, and mid-training starts from its weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.small import run_pipeline, small_data, small_rl, step_status
from tests.model.hf_checkpoint import write_checkpoint

pytestmark = pytest.mark.slow

# A small learning rate: after a few steps the weights are still visibly the imported ones.
STAGE = {"microBatchSize": 2, "sequenceLength": 128, "warmupSteps": 1, "checkpointEvery": 2,
         "learningRate": 1e-4}
SPEC = {
    "data": small_data(30),
    "stages": [
        {"name": "midtrain", "steps": 3, **STAGE},
        {"name": "sft", "steps": 2, **STAGE},
        small_rl(steps=1, learning_rate=1e-5),
    ],
    "evaluation": {"heldOutTraces": 4, "cruxevalLimit": 4, "maxNewTokens": 8,
                   "mutateFixTasks": 1, "mutateFixTurns": 2},
}
STEPS = ["traces", "trajectories", "corpus", "import", "midtrain", "sft", "rl"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("init")
    # bf16, as released CWM: the CPU stages train it as float32
    source = write_checkpoint(root / "released", shard="60KB", dtype=torch.bfloat16)
    _, workdir = run_pipeline(root, {
        "apiVersion": "cwm.dev/v1alpha1", "kind": "CWMPipeline", "metadata": {"name": "init"},
        "spec": {"model": {"init": str(source)}, **SPEC}})
    return source, workdir


def test_midtrain_sft_rl_run_from_the_imported_checkpoint(run):
    source, workdir = run
    steps = step_status(workdir)
    assert list(steps) == STEPS  # no tokenizer training, no pretraining
    assert {s["state"] for s in steps.values()} == {"Succeeded"}
    assert "rl_heldout_accuracy" in steps["rl"]["metrics"]
    artifacts = workdir / "artifacts"
    released = (source / "tokenizer.json").read_text()
    for stage in ("midtrain", "sft", "rl"):  # the released tokenizer and shape throughout
        config = json.loads((artifacts / stage / "checkpoint/config.json").read_text())["model"]
        assert config["vocab_size"] == 768 and config["n_layers"] == 4 and config["dim"] == 64
        assert json.loads((artifacts / stage / "checkpoint/tokenizer.json").read_text()) == \
            json.loads(released)


def test_midtrain_starts_from_the_imported_weights(run):
    _, workdir = run
    imported = load_file(str(workdir / "artifacts/import/checkpoint/model.safetensors"))
    trained = load_file(str(workdir / "artifacts/midtrain/checkpoint/model.safetensors"))
    assert sorted(imported) == sorted(trained)
    assert imported["output.weight"].dtype == torch.bfloat16  # the release's dtype, kept
    assert trained["output.weight"].dtype == torch.float32
    for name in ("tok_embeddings.weight", "layers.0.attention.wq.weight", "output.weight"):
        start = imported[name].float()
        change = (trained[name] - start).norm() / start.norm()
        assert 0 < change < 0.1, (name, float(change))  # trained a little, from these weights
    assert not torch.equal(trained["output.weight"], imported["output.weight"].float())
