"""``cwm import-hf``: random CwmForCausalLM checkpoints written by ``transformers`` (one file, and
sharded with an index) import to a model whose logits equal transformers', ``cwm export-hf`` of
the import gives back the same tensors, config fields and tokenizer, and bad sources are refused
naming the file or field."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # the dev extra: pip install -e '.[dev]'
from safetensors import safe_open
from tokenizers import Tokenizer

from cwm_model.checkpoint import load_checkpoint
from cwm_model.cli import main
from cwm_model.hf_export import HF_GLOBAL_NAMES, HF_NAMES, cwm_name, hf_name
from cwm_model.hf_import import layer_pattern
from tests.model.hf_checkpoint import write_checkpoint

pytestmark = pytest.mark.slow  # transformers' import and model construction: seconds each


@pytest.fixture(scope="module", params=["single", "sharded", "sharded-bf16"])
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    shard = "60KB" if "sharded" in request.param else None
    dtype = torch.bfloat16 if "bf16" in request.param else torch.float32  # as released CWM
    source = write_checkpoint(root / "src", shard=shard, dtype=dtype)
    if shard:
        assert (source / "model.safetensors.index.json").exists()
        assert len(list(source.glob("model-*.safetensors"))) > 4
    assert main(["import-hf", str(source), str(root / "ours")]) == 0
    return source, root / "ours"


def hf_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def test_imported_logits_equal_transformers(imported):
    source, ours = imported
    model, tokenizer, extra = load_checkpoint(ours)
    theirs = transformers.CwmForCausalLM.from_pretrained(source, attn_implementation="eager")
    theirs.eval()
    assert next(model.parameters()).dtype == next(theirs.parameters()).dtype  # kept, not cast
    model, theirs = model.float(), theirs.float()  # the same weights, compared in float32
    assert extra["stage"] == "import-hf" and extra["source"] == str(source)
    # 300 tokens: past the 128-token original RoPE context and several 64-token local windows.
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 300), generator=generator)
    with torch.no_grad():
        difference = (model(ids) - theirs(ids).logits).abs().max().item()
    assert difference < 1e-4


def test_export_of_the_import_round_trips_bit_exactly(imported, tmp_path):
    source, ours = imported
    assert main(["export-hf", str(ours), str(tmp_path / "back")]) == 0
    before, after = hf_tensors(source), hf_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert tensor.dtype == after[name].dtype and torch.equal(tensor, after[name]), name
    config = json.loads((source / "config.json").read_text())
    exported = json.loads((tmp_path / "back/config.json").read_text())
    assert {k: config[k] for k in exported} == exported  # every field written is the source's
    same = Tokenizer.from_file(str(source / "tokenizer.json")).to_str()
    assert Tokenizer.from_file(str(tmp_path / "back/tokenizer.json")).to_str() == same


def test_one_name_table_serves_both_directions():
    for ours in [*HF_GLOBAL_NAMES, *(f"layers.7.{name}" for name in HF_NAMES)]:
        assert cwm_name(hf_name(ours)) == ours
    with pytest.raises(KeyError, match="rotary"):
        cwm_name("model.rotary_emb.inv_freq")


def test_layer_patterns_map_to_global_every():
    full, slide = "full_attention", "sliding_attention"
    assert layer_pattern([full, slide, slide, slide, full, slide, slide, slide], "c") == (4, False)
    assert layer_pattern([full, slide, slide, full], "c") == (3, False)
    assert layer_pattern([full, slide, slide, full, slide, full], "c") == (3, True)
    with pytest.raises(ValueError, match="layer_types"):
        layer_pattern([slide, full], "c")


def test_bad_sources_are_refused_naming_the_file(tmp_path, capsys):
    source = write_checkpoint(tmp_path / "src", layers=2, dim=32)
    assert main(["import-hf", str(tmp_path / "missing"), str(tmp_path / "a")]) == 1
    assert "config.json" in capsys.readouterr().err
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3,
                                                     "layer_types": None}))
    assert main(["import-hf", str(source), str(tmp_path / "b")]) == 1
    assert "missing tensors: ['layers.2." in capsys.readouterr().err
    (source / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    assert main(["import-hf", str(source), str(tmp_path / "c")]) == 1
    assert "config.json: hidden_act is 'gelu'" in capsys.readouterr().err
    (source / "config.json").write_text(json.dumps(config))
    (source / "tokenizer.json").unlink()
    assert main(["import-hf", str(source), str(tmp_path / "d")]) == 1
    assert "no tokenizer.json" in capsys.readouterr().err
    for name in "abcd":
        assert not (tmp_path / name).exists()  # nothing half-written left behind
