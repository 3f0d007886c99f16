"""The rehearsal text (cwm_jobs.rehearsal), the rehearsal source of the stages, and SFT's two
answer modes."""

from __future__ import annotations

import json

import pytest

from cwm_jobs import rehearsal
from cwm_jobs.sources import answers_directly
from cwm_spec.artifacts import iter_records, read_manifest


def test_sections_end_at_paragraph_breaks_past_the_limit():
    text = "\n\n".join(f"paragraph {i} " + "x" * 40 for i in range(10))
    pieces = rehearsal.sections(text, limit=100)
    assert "\n\n".join(pieces) == text
    assert all(len(p) >= 100 for p in pieces[:-1]) and len(pieces) == 5


def test_the_interpreters_documentation_is_english_prose_not_code():
    topics = rehearsal.documentation_topics()
    records = rehearsal.records_of(topics)
    assert len(topics) > 50 and len(records) > 100
    text = " ".join(r["text"] for r in records)
    words = text.split()
    assert sum(w.lower() in ("the", "is", "a", "of") for w in words) / len(words) > 0.05
    assert len({r["sha256"] for r in records}) == len(records)


def test_the_step_writes_a_text_data_set_with_a_validation_split(tmp_path):
    out = tmp_path / "rehearsal"
    config = {"apiVersion": "cwm.dev/v1alpha1", "pipeline": "t", "step": "rehearsal",
              "kind": "job", "seed": 0, "spec": {"uri": None}, "inputs": {},
              "outputs": {"dataset": str(out)}}
    path = tmp_path / "step.json"
    path.write_text(json.dumps(config))
    manifest = rehearsal.main(["--config", str(path)])
    assert manifest.kind == "text" and read_manifest(str(out)).records("validation") >= 1
    train = {r["sha256"] for r in iter_records(str(out), "train")}
    validation = {r["sha256"] for r in iter_records(str(out), "validation")}
    assert train and not train & validation
    config["spec"] = {"uri": "s3://b/text"}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="spec.uri s3://b/text"):
        rehearsal.main(["--config", str(path)])


def test_a_rehearsal_share_needs_the_rehearsal_text_never_the_corpus(pipeline_data, tmp_path,
                                                                     tokenizer):
    from cwm_jobs.common import load_context
    from cwm_jobs.sources import stage_sources
    from tests.jobs.jobhelpers import stage_config

    inputs = {k: v for k, v in pipeline_data.items() if k != "rehearsal"}
    ctx = load_context("midtrain", ["--config", str(stage_config(tmp_path, "midtrain", inputs))])
    with pytest.raises(ValueError, match="dataMix.rehearsal is 0.3 but inputs.rehearsal"):
        stage_sources(ctx, tokenizer)
    ctx = load_context("midtrain", ["--config",
                                    str(stage_config(tmp_path, "midtrain", pipeline_data))])
    by_name = {s.name: s.uri for s in stage_sources(ctx, tokenizer)}
    assert by_name["rehearsal"] == pipeline_data["rehearsal"] != by_name["code"]


def test_sft_teaches_half_the_questions_each_way():
    direct = [answers_directly(f"trace {i}") for i in range(2000)]
    assert 0.45 < sum(direct) / len(direct) < 0.55
    assert answers_directly("trace 7") == answers_directly("trace 7")
