"""Two runs of one data step with the same settings write the same data set, byte for byte: the
same manifest (so the runner's digests, the cache keys of every later step, match too) and the
same shards. Trajectory records carry no random episode id or wall time; manifests carry no
timing (the steps return and log it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cwm_spec import artifacts, storage

pytestmark = pytest.mark.slow

STEPS = {
    "traces": ["--source", "synthetic:40", "--shards", "2"],
    "trajectories": ["--repo", "calc", "--tasks-per-repo", "2", "--held-out-tasks", "1",
                     "--max-turns", "8", "--shards", "2"],
}


def run_step(step: str, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"cwm_beam.{step}", *STEPS[step],
                           "--output", str(output)],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("step", sorted(STEPS))
def test_two_runs_write_the_same_data_set(step, tmp_path):
    outputs = [tmp_path / "first", tmp_path / "second"]
    for output in outputs:
        done = run_step(step, output)
        assert done.returncode == 0, done.stderr[-4000:]
    first, second = ((o / artifacts.MANIFEST).read_bytes() for o in outputs)
    assert first == second
    assert storage.tree_digest(str(outputs[0])) == storage.tree_digest(str(outputs[1]))
    manifest = artifacts.verify(str(outputs[0]))
    assert manifest.records("train") > 0
    assert "seconds" not in manifest.stats  # timing is not what the data are
    if step == "trajectories":
        ids = [r["meta"]["episode_id"] for r in artifacts.iter_records(str(outputs[0]))]
        assert len(set(ids)) == len(ids)  # one episode per task, each its own id
