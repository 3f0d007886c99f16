"""The local runner: ordering, caching, resume after kill -9, rerun from a changed step,
failures with their log tail, Ctrl-C. Steps are the test-only stand-in (standin_step.py), run
as real subprocesses from the real plan of a real manifest."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cwm_operator.cli import main as cwm
from cwm_operator.runner import LocalRunner, RunError, summarize
from tests.pipeline.run_standin import standin_plan

HERE = Path(__file__).parent
ORDER = ["traces", "trajectories", "corpus", "tokenizer", "pretrain", "midtrain", "sft", "rl"]
MANIFEST = {
    "apiVersion": "cwm.dev/v1alpha1",
    "kind": "CWMPipeline",
    "metadata": {"name": "unit"},
    "spec": {"stages": [{"name": n, "steps": 3, "warmupSteps": 0} for n in ORDER[4:]]},
}


@pytest.fixture
def env(tmp_path, monkeypatch):
    calls = tmp_path / "calls.log"
    calls.touch()
    monkeypatch.setenv("STANDIN_CALLS", str(calls))
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    return tmp_path, manifest, calls


def called(calls: Path) -> list[str]:
    return [line.split()[0] for line in calls.read_text().splitlines()]


def run(manifest: Path, workdir: Path, first: int | None = None) -> None:
    LocalRunner(standin_plan(str(manifest), workdir, first), workdir).run()


def states(workdir: Path) -> dict[str, str]:
    return {r.name: r.state for r in summarize(workdir)["steps"]}


def test_runs_steps_in_order_then_everything_is_cached(env):
    tmp, manifest, calls = env
    run(manifest, tmp / "w")
    assert called(calls) == ORDER
    assert set(states(tmp / "w").values()) == {"Succeeded"}
    metrics = summarize(tmp / "w")["steps"][-1].metrics
    assert metrics == {"validation_loss": 1.5, "cruxeval_o": 0.25}

    run(manifest, tmp / "w")
    assert called(calls) == ORDER  # nothing ran again
    assert set(states(tmp / "w").values()) == {"Cached"}


def test_changing_sft_reruns_sft_and_rl_only(env):
    tmp, manifest, calls = env
    run(manifest, tmp / "w")
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["stages"][2]["learningRate"] = 1e-5
    manifest.write_text(yaml.safe_dump(doc))
    run(manifest, tmp / "w")
    assert called(calls) == ORDER + ["sft", "rl"]
    assert states(tmp / "w")["midtrain"] == "Cached"


def test_damaged_output_reruns_that_step(env):
    tmp, manifest, calls = env
    run(manifest, tmp / "w")
    (tmp / "w/artifacts/tokenizer/tokenizer/payload.json").unlink()
    run(manifest, tmp / "w")
    # the tokenizer's output is rewritten identically, so its readers stay valid
    assert called(calls) == ORDER + ["tokenizer"]


def test_resume_after_a_stop_between_steps(env):
    tmp, manifest, calls = env
    run(manifest, tmp / "w", first=5)  # the disk state of a runner stopped after pretrain
    run(manifest, tmp / "w")
    assert called(calls) == ORDER


def test_failing_step_stops_the_run_after_its_retries_and_shows_its_log(env, monkeypatch):
    tmp, manifest, calls = env
    monkeypatch.setenv("STANDIN_FAIL_PRETRAIN", "1")
    with pytest.raises(RunError) as err:
        run(manifest, tmp / "w")
    assert "step 'pretrain' failed: exited with status 7 (attempt 3 of 3)" in str(err.value)
    assert "deliberate failure for the test" in str(err.value)
    assert called(calls) == ORDER[:5] + ["pretrain"] * 2  # retries: 2, as the operator does
    assert states(tmp / "w")["pretrain"] == "Failed"
    assert states(tmp / "w")["midtrain"] == "Pending"

    monkeypatch.delenv("STANDIN_FAIL_PRETRAIN")
    run(manifest, tmp / "w")
    assert called(calls) == ORDER[:5] + ["pretrain"] * 2 + ORDER[4:]


def test_a_step_that_fails_once_succeeds_on_its_retry(env, monkeypatch):
    tmp, manifest, calls = env
    monkeypatch.setenv("STANDIN_FAIL_ONCE_CORPUS", str(tmp / "corpus-failed-once"))
    run(manifest, tmp / "w")
    assert called(calls) == ORDER[:3] + ["corpus"] + ORDER[3:]
    record = {r.name: r for r in summarize(tmp / "w")["steps"]}["corpus"]
    assert record.state == "Succeeded" and record.attempts == 2
    log = (tmp / "w/steps/corpus/log.txt").read_text()
    assert "==> attempt 1" in log and "==> attempt 2" in log


def test_a_step_past_its_deadline_is_stopped_and_fails(env, monkeypatch):
    tmp, manifest, calls = env
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["stages"][0].update(deadlineSeconds=2, retries=0)
    manifest.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("STANDIN_SLEEP_PRETRAIN", "60")
    started = time.monotonic()
    with pytest.raises(RunError, match=r"ran past its deadline of 2 s \(deadlineSeconds\)"):
        run(manifest, tmp / "w")
    assert time.monotonic() - started < 30  # stopped, not waited for
    assert states(tmp / "w")["pretrain"] == "Failed"


def _start_runner(tmp: Path, manifest: Path, workdir: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "run_standin.py"), str(manifest), str(workdir)],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _wait_for_state(workdir: Path, step: str, state: str, timeout: float = 60) -> dict:
    path = workdir / "steps" / step / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = json.loads(path.read_text())
            if data["state"] == state:
                return data
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{step} never reached {state}")


def _wait_for_call(calls: Path, step: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while step not in called(calls):
        assert time.monotonic() < deadline, f"{step} never started"
        time.sleep(0.05)


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie counts as gone
        status = Path(f"/proc/{pid}/status")
        if status.exists() and "zombie" in status.read_text():
            return True
        time.sleep(0.05)
    return False


def _runner_inside(env, step: str):
    """A background runner on a fresh workdir, held inside ``step`` (its stand-in sleeps 60 s):
    (manifest, calls, workdir, runner, the step's pid)."""
    tmp, manifest, calls = env
    workdir = tmp / "w"
    runner = _start_runner(tmp, manifest, workdir, **{f"STANDIN_SLEEP_{step.upper()}": "60"})
    child = _wait_for_state(workdir, step, "Running")["pid"]
    _wait_for_call(calls, step)
    return manifest, calls, workdir, runner, child


@pytest.mark.slow
def test_kill_9_during_a_step_then_resume(env):
    manifest, calls, workdir, runner, child = _runner_inside(env, "midtrain")
    runner.kill()  # SIGKILL
    runner.wait()
    assert _gone(child), "the step's process outlived its killed runner"
    assert states(workdir)["midtrain"] == "Interrupted"  # summarize: Running but process gone

    run(manifest, workdir)
    assert called(calls) == ORDER[:6] + ["midtrain", "sft", "rl"]
    assert states(workdir)["pretrain"] == "Cached"


@pytest.mark.slow
def test_ctrl_c_stops_the_step_and_leaves_a_resumable_directory(env):
    manifest, calls, workdir, runner, child = _runner_inside(env, "sft")
    runner.send_signal(signal.SIGINT)
    assert runner.wait(timeout=90) == 130  # a runner that ignored Ctrl-C would finish: 0
    assert _gone(child)
    assert states(workdir)["sft"] == "Interrupted"
    assert json.loads((workdir / "run.json").read_text())["state"] == "Interrupted"
    run(manifest, workdir)
    assert called(calls) == ORDER[:7] + ["sft", "rl"]


def test_second_runner_on_the_same_directory_is_refused(env):
    tmp, manifest, _ = env
    workdir = tmp / "w"
    runner = _start_runner(tmp, manifest, workdir, STANDIN_SLEEP_TRACES="30")
    try:
        _wait_for_state(workdir, "traces", "Running")
        with pytest.raises(RunError, match="in use by another"):
            run(manifest, workdir)
    finally:
        runner.kill()
        runner.wait()


def test_missing_step_implementation_is_named_before_anything_runs(env):
    tmp, manifest, calls = env
    plan = standin_plan(str(manifest), tmp / "w")
    steps = list(plan.steps)
    steps[6] = dataclasses.replace(steps[6], module="cwm_jobs.not_written_yet")
    with pytest.raises(RunError, match="step 'sft' runs `python -m cwm_jobs.not_written_yet`"):
        LocalRunner(dataclasses.replace(plan, steps=tuple(steps)), tmp / "w").run()
    assert called(calls) == []


def test_status_of_a_directory_without_a_run(tmp_path, capsys):
    assert cwm(["status", str(tmp_path)]) == 1
    assert "no run here" in capsys.readouterr().err


def test_report_has_tables_and_plots(env):
    tmp, manifest, _ = env
    run(manifest, tmp / "w")
    assert cwm(["report", str(tmp / "w")]) == 0
    report = (tmp / "w/report/report.md").read_text()
    assert "| pretrain | Succeeded |" in report
    assert "| rl | 1.5 | 0.25 |" in report  # validation_loss, cruxeval_o
    assert "| sft | 5.0000 | 1.6667 | 3 |" in report  # first, last loss, steps
    for png in ("loss.png", "metrics.png"):
        assert (tmp / "w/report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_two_runs(env, monkeypatch):
    tmp, manifest, _ = env
    run(manifest, tmp / "a")
    run(manifest, tmp / "b")
    assert cwm(["compare", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "c.md")]) == 0
    text = (tmp / "c.md").read_text()
    assert "## After midtrain" in text and "| cruxeval_o | 0.25 | 0.25 |" in text


def test_steps_do_not_inherit_a_callers_rendezvous(env, monkeypatch):
    """A caller's MASTER_PORT (a torchrun, a test holding a process group) would send a training
    step to that port: the runner lays out each step itself."""
    tmp, manifest, calls = env
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("PET_NNODES", "4")
    monkeypatch.setenv("STANDIN_DUMP_ENV", str(tmp / "env.json"))
    run(manifest, tmp / "w")
    seen = json.loads((tmp / "env.json").read_text())
    assert "MASTER_PORT" not in seen and "PET_NNODES" not in seen
    assert seen["STANDIN_CALLS"] == str(calls)  # everything else is passed on
