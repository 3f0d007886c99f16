"""Checkpoints: identical logits after a round trip, atomic replacement, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from cwm_model.checkpoint import load_checkpoint, save_checkpoint
from cwm_model.model import CWM
from cwm_model.presets import get_preset


def test_round_trip_gives_identical_logits(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = CWM(get_preset("debug", rope_factor=4.0, rope_original_context=16))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, extra={"stage": "sft", "step": 3})
    loaded, tok, extra = load_checkpoint(tmp_path / "ckpt")
    x = torch.randint(0, 768, (2, 30))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert loaded.config == model.config and not loaded.training
    assert tok.encode("<|frame_sep|>x") == tokenizer.encode("<|frame_sep|>x")
    assert extra == {"stage": "sft", "step": 3}


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, CWM(get_preset("debug")))
    wrapped = torch.nn.Module()
    wrapped.module = CWM(get_preset("debug", n_layers=2))  # as DeepSpeed / DDP wrap it
    save_checkpoint(path, wrapped)
    model, tok, extra = load_checkpoint(path)
    assert model.config.n_layers == 2 and tok is None and extra == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_errors_name_the_file(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, CWM(get_preset("debug")))
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(tmp_path / "nowhere")
    config = json.loads((path / "config.json").read_text())
    config["model"]["n_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(path)
    config["model"]["n_heads"] = 0
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="n_heads"):
        load_checkpoint(path)
