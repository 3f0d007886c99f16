"""The cwm-trainer image (its CPU variant: the one built here, see jobs/Dockerfile) runs the
pretrain stage as its PyTorchJob pod would: `torchrun --nnodes=1 --nproc-per-node=1 -m
cwm_jobs.pretrain` with the operator's $CWM_STEP_CONFIG, on the CPU, without network.

Its inputs are made by the project's own steps in the cwm-beam image first (the corpus step, then
the tokenizer step), on the same /data volume; the trainer pod sees them under /data as well."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.images.plans import cluster_plan, host_path, tiny_doc
from tests.images.podrun import PodRunner, bind

pytestmark = [pytest.mark.images, pytest.mark.slow]

POD_UID = 65532
STEPS = 4


def debug_doc() -> dict:
    """The `debug` model, a small corpus and tokenizer, and a few pretrain steps: no Beam steps."""
    doc = tiny_doc("trainer")
    spec = doc["spec"]
    spec["model"] = {"preset": "debug"}
    spec["tokenizer"] = {"vocabSize": 512, "sampleRecords": 500}
    spec["data"] = {"traces": {"enabled": False}, "trajectories": {"enabled": False},
                    "corpus": {"maxFiles": 100, "maxBytes": 400_000}}
    spec["stages"] = [{"name": "pretrain", "steps": STEPS, "microBatchSize": 2,
                       "sequenceLength": 64, "warmupSteps": 1, "checkpointEvery": STEPS}]
    spec["evaluation"] = {"heldOutTraces": 0, "cruxeval": True, "cruxevalLimit": 2,
                          "maxNewTokens": 4, "mutateFix": False}
    return doc


def test_pretrain_steps_on_the_cpu_write_a_checkpoint(images: dict[str, str], pod: PodRunner,
                                                      tmp_path: Path) -> None:
    plan = cluster_plan(debug_doc())
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, POD_UID, POD_UID)
    volume = [bind(str(data), "/data", read_only=False)]
    for name in ("corpus", "tokenizer"):
        step = plan.step(name)
        done = pod.run(step.image, step.command, env=step.env, mounts=volume, timeout=600)
        assert done.exit_code == 0, f"{name}:\n{done.logs[-4000:]}"
    step = plan.step("pretrain")
    assert step.image == images["cwm-trainer"] and step.command[0] == "torchrun"
    env = {**step.env, "OMP_NUM_THREADS": "2"}  # the pod's CPU request, as the chart sizes it
    done = pod.run(step.image, step.command, env=env, mounts=volume, timeout=900)
    assert done.exit_code == 0, done.logs[-6000:]
    checkpoint = host_path(data, step.outputs["checkpoint"])
    files = sorted(p.name for p in checkpoint.rglob("*") if p.is_file())
    assert any(f.endswith(".safetensors") for f in files), files
    metrics = host_path(data, step.outputs["metrics"]) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(loss == loss and loss > 0 for loss in losses), rows[-3:]
    print(f"\npretrain ({STEPS} steps, debug preset) in the trainer pod: {done.seconds:.1f} s; "
          f"checkpoint files {files}")
