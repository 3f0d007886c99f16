"""Two processes under ``torchrun --nproc_per_node 2`` (gloo, ZeRO-2): every stage runs, and the
parameters stay identical across ranks (each stage checks it and reports ``ranks_identical``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cwm_jobs.metrics import read_metrics
from tests.jobs.jobhelpers import stage_config, subprocess_env

REPO = Path(__file__).resolve().parents[2]
RL_SPEC = {"steps": 2, "rl": {"groupSize": 4, "promptsPerStep": 2, "maxNewTokens": 6, "maxLength": 256}}


def torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_every_stage_runs_as_two_processes(pipeline_data, tmp_path):
    pre = stage_config(tmp_path, "pretrain", pipeline_data)
    torchrun(["-m", "cwm_jobs.pretrain", "--config", str(pre)])
    configs = []
    previous = "pretrain"
    for stage in ("midtrain", "sft", "rl"):
        spec = RL_SPEC if stage == "rl" else None
        cfg = stage_config(tmp_path, stage, pipeline_data, spec=spec,
                           init=str(tmp_path / previous / "checkpoint"))
        configs.append(f"{stage}:{cfg}")
        previous = stage
    torchrun([str(REPO / "tests" / "jobs" / "chain_driver.py"), *configs])
    for stage in ("pretrain", "midtrain", "sft", "rl"):
        evaluation = json.loads((tmp_path / stage / "metrics" / "eval.json").read_text())
        assert evaluation["ranks_identical"] == 1.0
        latest = json.loads((tmp_path / stage / "state" / "latest.json").read_text())
        assert latest["worldSize"] == 2
        state = tmp_path / stage / "state" / latest["tag"]
        assert {p.name for p in state.glob("data-rank*.json")} == {"data-rank0.json", "data-rank1.json"}
        assert len(list(state.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # ZeRO-2 partitions
        steps = [r["step"] for r in read_metrics(tmp_path / stage / "metrics" / "metrics.jsonl")]
        assert steps == list(range(1, latest["step"] + 1))
    # the two ranks read different documents (data parallelism), recorded per rank
    ranks = [json.loads((tmp_path / "pretrain" / "state" / "step00000004" / f"data-rank{r}.json").read_text())
             for r in (0, 1)]
    assert ranks[0] != ranks[1]
