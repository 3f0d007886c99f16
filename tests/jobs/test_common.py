"""Process setup: distributed layout from the environment, stage settings, caches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cwm_jobs.common import (
    DistEnv,
    default_cache_dir,
    dist_env_from,
    ensure_extension_cache,
    load_context,
)
from cwm_jobs.metrics import write_termination_message


def test_a_plain_process_is_rank_zero_of_one():
    env = dist_env_from({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")
    assert env.master_port > 0


def test_torchrun_variables_win():
    env = dist_env_from({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                         "MASTER_PORT": "1234", "PET_NNODES": "2"})
    assert env == DistEnv(3, 4, 1, "h", 1234, "torchrun")


def test_training_operator_variables_for_one_process_per_pod():
    env = dist_env_from({"PET_NODE_RANK": "2", "PET_NNODES": "3", "PET_NPROC_PER_NODE": "1",
                         "PET_MASTER_ADDR": "job-master-0", "PET_MASTER_PORT": "23456"})
    assert env == DistEnv(2, 3, 0, "job-master-0", 23456, "operator")
    env = dist_env_from({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "m", "MASTER_PORT": "9"})
    assert (env.rank, env.world_size, env.launcher) == (1, 2, "operator")


def test_inconsistent_environments_are_errors_naming_the_variable():
    with pytest.raises(ValueError, match="PET_NPROC_PER_NODE=8.*torchrun"):
        dist_env_from({"PET_NODE_RANK": "0", "PET_NNODES": "1", "PET_NPROC_PER_NODE": "8"})
    with pytest.raises(ValueError, match="RANK=4 is outside WORLD_SIZE=2"):
        dist_env_from({"RANK": "4", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        dist_env_from({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"})


def test_extension_cache_defaults_under_the_cwm_cache():
    env = {"CWM_CACHE": "/somewhere"}
    assert ensure_extension_cache(env) == "/somewhere/torch_extensions"
    assert ensure_extension_cache({"TORCH_EXTENSIONS_DIR": "/x"}) == "/x"
    assert default_cache_dir({}).name == ".cache"


def context(tmp_path, spec, stage):
    config = {"pipeline": "p", "step": stage, "kind": "train", "spec": spec,
              "inputs": {}, "outputs": {}}
    path = tmp_path / f"{stage}.json"
    path.write_text(json.dumps(config))
    return load_context(stage, ["--config", str(path)])


def test_stage_settings_come_from_the_api_defaults(tmp_path):
    midtrain = context(tmp_path, {"name": "midtrain"}, "midtrain").settings
    assert midtrain.data_mix.model_dump() == {"cwm": 0.3, "code": 0.4, "rehearsal": 0.3}
    assert midtrain.schedule == "cosine" and midtrain.zero_stage == 2
    assert midtrain.min_learning_rate == pytest.approx(midtrain.learning_rate / 10)
    sft = context(tmp_path, {"name": "sft"}, "sft").settings
    assert sft.schedule == "constant"
    rl = context(tmp_path, {"name": "rl", "rl": {"groupSize": 4}}, "rl").settings
    assert (rl.rl.group_size, rl.rl.eps_low, rl.rl.eps_high) == (4, 0.2, 0.25)


def test_a_bad_stage_section_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"spec\.rl\.groupSize: .*greater than or equal to 2"):
        context(tmp_path, {"name": "rl", "rl": {"groupSize": 1}}, "rl")
    with pytest.raises(ValueError, match=r"spec\.dataMix: at least one weight must be positive"):
        context(tmp_path, {"name": "midtrain", "dataMix": {"cwm": 0}}, "midtrain")


def test_load_context_rejects_the_wrong_stage_and_bad_fields(tmp_path):
    config = {"pipeline": "p", "step": "sft", "kind": "train", "seed": 3, "spec": {"name": "sft"},
              "inputs": {}, "outputs": {}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="spec.name is 'sft' but this entry point runs 'pretrain'"):
        load_context("pretrain", ["--config", str(path)])
    ctx = load_context("sft", ["--config", str(path), "--extra"])
    assert ctx.seed == 3 and ctx.extra_args == ["--extra"]
    with pytest.raises(ValueError, match="outputs.checkpoint is required for sft"):
        ctx.output("checkpoint")
    config["spec"] = {"name": "sft", "zeroStage": 7}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="zeroStage"):
        load_context("sft", ["--config", str(path)])


def test_the_evaluation_is_the_pods_termination_message_only_in_a_pod(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    assert write_termination_message({"loss": 1.5}, log) is False and not log.exists()  # not a pod
    log.touch()  # the kubelet creates the file in a pod
    assert write_termination_message({"loss": 1.5, "pass_at_1": 0.25}, log) is True
    assert json.loads(log.read_text()) == {"loss": 1.5, "pass_at_1": 0.25}
    log.write_text("")
    too_long = {f"metric_{i:04d}": float(i) for i in range(400)}
    assert write_termination_message(too_long, log) is False and log.read_text() == ""


def test_the_tokenizer_renders_trajectories_without_torch() -> None:
    """The tokenizer step runs on the Beam image, which has no torch: rendering a trajectory
    (with the agent's tools) must not import it. Its first run in a pod failed on this."""
    code = ("import sys\n"
            "sys.modules['torch'] = None  # as on the Beam image: `import torch` fails\n"
            "from cwm_jobs.tokenizer import record_text\n"
            "text = record_text('trajectories', {'messages': [\n"
            "    {'role': 'user', 'content': 'fix the bug'},\n"
            "    {'role': 'assistant', 'content': 'done'}]})\n"
            "assert text and 'fix the bug' in text, text\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
