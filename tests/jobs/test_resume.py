"""Kill -9 in the middle of a stage, rerun: it resumes from the last complete save, with the same
data order, and its losses equal those of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cwm_jobs.metrics import read_metrics
from tests.jobs.jobhelpers import stage_config, subprocess_env

REPO = Path(__file__).resolve().parents[2]
SPEC = {"steps": 24, "checkpointEvery": 4, "sequenceLength": 64, "microBatchSize": 4,
        "gradientAccumulation": 2, "warmupSteps": 3}
NO_EVAL = {"cruxeval": False, "heldOutTraces": 0, "validationSequences": 8}


def launch(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cwm_jobs.midtrain", "--config", str(config)],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def steps_logged(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    return len([line for line in metrics.read_text().splitlines() if line.strip()])


@pytest.mark.slow
def test_killed_stage_resumes_with_identical_losses(pipeline_data, tmp_path):
    # midtrain: three sources mixed, so the resumed data order covers the mixer's state too
    init_dir = tmp_path / "init"
    init = stage_config(init_dir, "pretrain", pipeline_data, spec={"steps": 1}, evaluation=NO_EVAL)
    subprocess.run([sys.executable, "-m", "cwm_jobs.pretrain", "--config", str(init)], cwd=REPO,
                   env=subprocess_env(), check=True, capture_output=True)
    checkpoint = str(init_dir / "pretrain" / "checkpoint")
    full = stage_config(tmp_path / "full", "midtrain", pipeline_data, spec=SPEC, init=checkpoint,
                        evaluation=NO_EVAL)
    killed = stage_config(tmp_path / "killed", "midtrain", pipeline_data, spec=SPEC, init=checkpoint,
                          evaluation=NO_EVAL)
    uninterrupted = launch(full)
    victim = launch(killed)
    metrics = tmp_path / "killed" / "midtrain" / "metrics" / "metrics.jsonl"
    deadline = time.time() + 300
    while steps_logged(metrics) < 10 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = steps_logged(metrics)
    assert 10 <= killed_at < 24, f"the kill landed at step {killed_at}"
    latest = json.loads((tmp_path / "killed" / "midtrain" / "state" / "latest.json").read_text())
    assert latest["step"] % 4 == 0 and latest["step"] <= killed_at

    resumed = launch(killed)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-4000:]
    assert f"resuming at step {latest['step']}" in out
    out, _ = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, out[-4000:]

    full = tmp_path / "full" / "midtrain" / "metrics" / "metrics.jsonl"
    reference = {r["step"]: r["loss"] for r in read_metrics(full)}
    after = {r["step"]: r["loss"] for r in read_metrics(metrics)}
    assert sorted(after) == sorted(reference) == list(range(1, 25))
    worst = max(abs(after[s] - reference[s]) / abs(reference[s]) for s in reference)
    print(f"resume: killed at step {killed_at}, resumed from {latest['step']}, "
          f"max relative loss difference over 24 steps {worst:.2e}")
    for step in range(1, 25):
        assert after[step] == pytest.approx(reference[step], rel=1e-3), step
    final = json.loads((tmp_path / "killed" / "midtrain" / "metrics" / "eval.json").read_text())
    expected = json.loads((tmp_path / "full" / "midtrain" / "metrics" / "eval.json").read_text())
    assert final["validation_loss"] == pytest.approx(expected["validation_loss"], rel=1e-3)


def run_stage(config: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "cwm_jobs.pretrain", "--config", str(config)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def with_fingerprint(config: Path, fingerprint: str, steps: int) -> Path:
    data = json.loads(config.read_text())
    data["fingerprint"], data["spec"]["steps"] = fingerprint, steps
    config.write_text(json.dumps(data))
    return config


@pytest.mark.slow
def test_state_saved_by_another_configuration_is_not_resumed(pipeline_data, tmp_path):
    # The state of a stage whose configuration (or an upstream stage) changed is not its own:
    # more steps asked must start again from the (new) inputs, not continue the old model.
    spec = {"steps": 6, "checkpointEvery": 3, "sequenceLength": 64, "microBatchSize": 2}
    config = stage_config(tmp_path, "pretrain", pipeline_data, spec=spec, evaluation=NO_EVAL)
    metrics = tmp_path / "pretrain" / "metrics" / "metrics.jsonl"
    latest = tmp_path / "pretrain" / "state" / "latest.json"

    out = run_stage(with_fingerprint(config, "aaaa", 6))
    assert "starting at step 0" in out
    first = {r["step"]: r["loss"] for r in read_metrics(metrics)}
    assert sorted(first) == list(range(1, 7))
    assert json.loads(latest.read_text())["fingerprint"] == "aaaa"

    out = run_stage(with_fingerprint(config, "bbbb", 9))
    assert "saved by another configuration" in out and "starting at step 0" in out, out[-3000:]
    assert "resuming" not in out
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    assert [r["step"] for r in lines] == list(range(1, 10)), "the old run's metrics were kept"
    # the same inputs and seed from step 0: the first steps repeat the first run's losses
    assert lines[0]["loss"] == pytest.approx(first[1], rel=1e-4)
    saved = json.loads(latest.read_text())
    assert (saved["fingerprint"], saved["step"]) == ("bbbb", 9)
    assert sorted(p.name for p in latest.parent.glob("step*")) == ["step00000006", "step00000009"]

    out = run_stage(config)  # the same configuration again: its own state, resumed
    assert "resuming at step 9" in out, out[-3000:]
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()] \
        == list(range(1, 10))
