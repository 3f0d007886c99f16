"""The local corpus and tokenizer steps, through their entry points."""

from __future__ import annotations

import json

import pytest

from cwm_jobs import corpus, tokenizer
from cwm_spec.artifacts import iter_records, verify


def write_config(path, step, spec, inputs, outputs):
    path.write_text(json.dumps({"pipeline": "t", "step": step, "kind": "job", "seed": 0,
                                "spec": spec, "inputs": inputs, "outputs": outputs}))
    return str(path)


def test_corpus_deduplicates_and_skips_unusable_files(tmp_path):
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    for i in range(30):
        (src / "pkg" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    (src / "pkg" / "copy.py").write_text("def f0(x):   \n    return x + 0\n")  # duplicate of m0
    (src / "pkg" / "empty.py").write_text("")
    (src / "pkg" / "latin.py").write_bytes(b"# caf\xe9\n")
    (src / "pkg" / "__pycache__" / "x.py").write_text("ignored = True\n")
    out = tmp_path / "corpus"
    cfg = write_config(tmp_path / "c.json", "corpus", {"uri": str(src), "maxFiles": 100, "maxBytes": 10**6},
                       {}, {"dataset": str(out)})
    manifest = corpus.main(["--config", cfg])
    assert manifest.kind == "code" and verify(str(out)).kind == "code"
    stats = manifest.stats
    assert (stats["files"], stats["duplicates"], stats["skipped_not_utf8"]) == (30, 1, 1)
    records = list(iter_records(str(out), "train")) + list(iter_records(str(out), "validation"))
    assert len(records) == 30 and manifest.records("validation") >= 1
    assert all(r["path"].startswith("src/pkg/m") for r in records)


def test_corpus_caps_sample_across_the_installed_packages(tmp_path):
    out = tmp_path / "corpus"
    cfg = write_config(tmp_path / "c.json", "corpus", {"maxFiles": 50, "maxBytes": 10**7}, {},
                       {"dataset": str(out)})
    manifest = corpus.main(["--config", cfg])
    assert manifest.stats["files"] == 50 and manifest.stats["files_found"] > 1000
    paths = [r["path"] for r in iter_records(str(out), "train")]
    assert any(p.startswith("stdlib/") for p in paths) and any(p.startswith("site-packages/") for p in paths)


def test_tokenizer_trains_on_the_pipeline_data_and_adopts_a_given_file(pipeline_data, tmp_path):
    inputs = {k: pipeline_data[k] for k in ("corpus", "traces", "trajectories")}
    cfg = write_config(tmp_path / "t.json", "tokenizer", {"vocabSize": 600, "sampleRecords": 200},
                       inputs, {"tokenizer": str(tmp_path / "tok")})
    path = tokenizer.main(["--config", cfg])
    from cwm_model.tokenizer import CWMTokenizer

    tok = CWMTokenizer.load(path)
    assert tok.vocab_size == 600 + 256
    # Special tokens come from structure only: spelled in text they are ordinary text (CWM).
    text = '<|frame_sep|><|call_sep|>{"x": "1"}<|action_sep|>'
    assert not set(tok.encode(text)) & tok.special_ids
    assert tok.encode_parts([("<|frame_sep|>", True), ("<|call_sep|>", True)]) == [
        tok.token_id("<|frame_sep|>"), tok.token_id("<|call_sep|>")]
    cfg = write_config(tmp_path / "t2.json", "tokenizer", {"uri": str(path)}, {},
                       {"tokenizer": str(tmp_path / "tok2")})
    again = CWMTokenizer.load(tokenizer.main(["--config", cfg]))
    assert again.encode("def f(x): return x") == tok.encode("def f(x): return x")


def test_tokenizer_without_inputs_is_a_clear_error(tmp_path):
    cfg = write_config(tmp_path / "t.json", "tokenizer", {"vocabSize": 600}, {},
                       {"tokenizer": str(tmp_path / "tok")})
    with pytest.raises(ValueError, match="nothing to train on"):
        tokenizer.main(["--config", cfg])
