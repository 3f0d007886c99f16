"""Every stage, in one process with ZeRO-2 on the CPU (``debug`` preset, a few steps each),
chained as the plan chains them: pretrain -> midtrain -> sft -> rl."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from cwm_jobs import midtrain, pretrain, rl, sft
from cwm_jobs.metrics import read_metrics
from tests.jobs.jobhelpers import stage_config

RL_SPEC = {"steps": 2, "rl": {"groupSize": 4, "promptsPerStep": 2, "maxNewTokens": 6, "maxLength": 256}}


@pytest.fixture(scope="module")
def chain(pipeline_data, dist_group, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain")
    results = {}
    results["pretrain"] = pretrain.main(["--config", str(stage_config(out, "pretrain", pipeline_data))])
    for module, previous in ((midtrain, "pretrain"), (sft, "midtrain")):
        name = module.__name__.rsplit(".", 1)[1]
        cfg = stage_config(out, name, pipeline_data, init=str(out / previous / "checkpoint"))
        results[name] = module.main(["--config", str(cfg)])
    cfg = stage_config(out, "rl", pipeline_data, init=str(out / "sft" / "checkpoint"), spec=RL_SPEC)
    results["rl"] = rl.main(["--config", str(cfg)])
    return out, results


@pytest.mark.parametrize("stage", ["pretrain", "midtrain", "sft", "rl"])
def test_each_stage_writes_checkpoint_state_metrics_and_eval(chain, pipeline_data, stage):
    from cwm_model.checkpoint import load_checkpoint

    out, results = chain
    model, tokenizer, extra = load_checkpoint(out / stage / "checkpoint")
    assert model.config.vocab_size == tokenizer.vocab_size == 768
    assert extra["stage"] == stage and extra["steps"] == (2 if stage == "rl" else 4)
    latest = json.loads((out / stage / "state" / "latest.json").read_text())
    assert latest["step"] == extra["steps"] and latest["worldSize"] == 1
    assert len(list((out / stage / "state").glob("step*"))) <= 2
    evaluation = json.loads((out / stage / "metrics" / "eval.json").read_text())
    assert evaluation == {k: pytest.approx(v) for k, v in results[stage].items()}
    assert all(isinstance(v, (int, float)) for v in evaluation.values())
    assert evaluation["ranks_identical"] == 1.0
    assert 0 <= evaluation["trace_step_exact_match"] <= 1 and evaluation["trace_frames"] > 0
    assert 0 <= evaluation["cruxeval_o_direct"] <= 1 and evaluation["cruxeval_o_problems"] == 4
    # reasoning-mode answers once the model speaks the chat format, each mode on its own budget
    chat = stage in ("sft", "rl")
    assert ("cruxeval_o_reasoning" in evaluation) == chat
    if chat:
        assert 0 <= evaluation["cruxeval_o_reasoning_unfinished"] <= 1
    # every evaluation program was looked up in the training data sets' program lists
    assert evaluation["decontamination_programs"] >= 4
    assert evaluation["decontamination_unchecked"] == 1  # the fixture trajectories list none
    records = read_metrics(out / stage / "metrics" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, extra["steps"] + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert list((out / stage / "metrics" / "tensorboard").glob("events.out.tfevents.*"))


def test_language_model_stages_report_validation_loss_per_source(chain):
    _, results = chain
    assert {k for k in results["pretrain"] if k.startswith("validation_loss/")} == {"validation_loss/code"}
    assert {"validation_loss/traces", "validation_loss/trajectories", "validation_loss/code",
            "validation_loss/rehearsal"} <= set(results["midtrain"])
    assert {"validation_loss/traces", "validation_loss/trajectories"} <= set(results["sft"])
    for stage in ("pretrain", "midtrain", "sft"):
        assert math.log(768) * 0.5 < results[stage]["validation_loss"] < math.log(768) * 1.2


def test_midtraining_draws_from_every_source_of_the_mix(chain):
    _, results = chain
    for source in ("code", "traces", "trajectories"):
        assert results["midtrain"][f"data/documents/{source}"] >= 1


def test_schedules_warm_up_then_decay_or_stay_constant(chain):
    out, _ = chain
    pre = [r["lr"] for r in read_metrics(out / "pretrain" / "metrics" / "metrics.jsonl")]
    assert pre[0] == pytest.approx(1.5e-3) and pre[1] == pytest.approx(3e-3)  # 1 warmup step
    assert pre[1] > pre[2] > pre[3] > 3e-4  # cosine towards minLearningRate
    lrs = [r["lr"] for r in read_metrics(out / "sft" / "metrics" / "metrics.jsonl")]
    assert lrs[1] == lrs[2] == lrs[3] == pytest.approx(3e-3)  # constant after warmup


def test_rl_logs_rewards_from_the_sandbox(chain):
    out, results = chain
    records = read_metrics(out / "rl" / "metrics" / "metrics.jsonl")
    assert all(0 <= r["reward_mean"] <= 1 and 0 <= r["groups_skipped"] <= 1 for r in records)
    assert 0 <= results["rl"]["rl_heldout_accuracy"] <= 1


def test_a_partial_save_is_never_loaded(chain, pipeline_data, tmp_path):
    """A newer tag without ``latest.json`` pointing at it (a save cut short) is ignored: rerunning
    a finished stage resumes from the complete save and only re-evaluates."""
    out, _ = chain
    work = tmp_path / "pretrain"
    shutil.copytree(out / "pretrain", work)
    partial = work / "state" / "step00000099"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    cfg = stage_config(tmp_path, "pretrain", pipeline_data)
    results = pretrain.main(["--config", str(cfg)])
    records = read_metrics(work / "metrics" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # no step was trained again
    lines = (work / "metrics" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert json.loads((work / "state" / "latest.json").read_text())["tag"] == "step00000004"
    assert results["validation_loss"] == pytest.approx(
        json.loads((out / "pretrain" / "metrics" / "eval.json").read_text())["validation_loss"])


def test_outputs_can_live_in_object_storage(pipeline_data, dist_group, tmp_path, monkeypatch):
    """``s3://``-style outputs (fsspec's in-memory file system here): DeepSpeed state, metrics and
    the checkpoint are staged locally and uploaded; a rerun resumes from the uploaded state."""
    import fsspec

    monkeypatch.setenv("CWM_CACHE", str(tmp_path / "cache"))
    cfg = stage_config(tmp_path, "pretrain", pipeline_data, spec={"steps": 2, "checkpointEvery": 1},
                       evaluation={"cruxeval": False, "heldOutTraces": 0, "validationSequences": 4})
    config = json.loads(cfg.read_text())
    config["outputs"] = {k: f"memory://bucket/run/pretrain/{k}" for k in ("checkpoint", "state", "metrics")}
    cfg.write_text(json.dumps(config))
    pretrain.main(["--config", str(cfg)])
    fs = fsspec.filesystem("memory")
    latest = json.loads(fs.cat("/bucket/run/pretrain/state/latest.json"))
    assert latest["tag"] == "step00000002"
    assert fs.exists("/bucket/run/pretrain/state/step00000002/data-rank0.json")
    assert fs.exists("/bucket/run/pretrain/checkpoint/model.safetensors")
    assert json.loads(fs.cat("/bucket/run/pretrain/metrics/eval.json"))["ranks_identical"] == 1.0
    shutil.rmtree(tmp_path / "cache")  # a new pod: nothing staged locally
    pretrain.main(["--config", str(cfg)])
    lines = fs.cat("/bucket/run/pretrain/metrics/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # resumed at 2, nothing retrained


def test_a_stage_refuses_to_score_programs_it_trained_on(pipeline_data, dist_group, tmp_path):
    """The fixture traces train on the 400 CRUXEval problems stage_config leaves trainable; an
    evaluation that holds out all 800 would score them: refused, not scored."""
    from cwm_spec.programs import ContaminationError

    cfg = stage_config(tmp_path, "pretrain", pipeline_data,
                       evaluation={"cruxevalHeldOut": 800, "cruxevalLimit": 800})
    with pytest.raises(ContaminationError, match=r"cruxeval: \d+ of 800 programs in traces/train"):
        pretrain.main(["--config", str(cfg)])
    assert not (tmp_path / "pretrain" / "metrics" / "eval.json").exists()
