"""``cwm export-hf``: transformers' own CwmForCausalLM loads the folder and agrees with us."""

from __future__ import annotations

import json

import pytest
import torch

from cwm_model.checkpoint import save_checkpoint
from cwm_model.cli import main
from cwm_model.hf_export import hf_config
from cwm_model.model import CWM
from cwm_model.presets import get_preset

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # a trained model / transformers import: seconds each


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """The tiny preset (with RoPE scaling active, so the llama3 path is compared too)."""
    torch.manual_seed(0)
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, rope_factor=8.0,
                        rope_original_context=256)
    model = CWM(config).eval()
    root = tmp_path_factory.mktemp("hf")
    save_checkpoint(root / "ckpt", model, tokenizer)
    assert main(["export-hf", str(root / "ckpt"), str(root / "hf")]) == 0
    return model, root / "hf"


def test_transformers_cwm_logits_match_ours(exported):
    model, folder = exported
    theirs = transformers.CwmForCausalLM.from_pretrained(folder, attn_implementation="eager")
    assert type(theirs).__name__ == "CwmForCausalLM"
    assert theirs.config.layer_types[:4] == ["full_attention", "sliding_attention",
                                             "sliding_attention", "sliding_attention"]
    # 600 tokens: past the 256-token original RoPE context, and over 4 local windows (128), so
    # our local layers take the banded path while Hugging Face masks the full square
    x = torch.randint(0, model.config.vocab_size, (2, 600), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, hf = model(x), theirs.eval()(x).logits
    assert (ours - hf).abs().max().item() < 1e-4


def test_exported_tokenizer_loads_with_auto_tokenizer(exported, tokenizer):
    _, folder = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "def f(x):<|frame_sep|><|eot_id|>"
    # Ours encodes special spellings as text (CWM's encode_ordinary); transformers does with
    # split_special_tokens, and parses them by default (for rendered chat templates).
    assert hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
        tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"][-2:] == [
        tokenizer.token_id("<|frame_sep|>"), tokenizer.eot_id]
    assert hf_tok.eos_token == "<|end_of_text|>"
    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"] == sorted(tokenizer.stop_ids)


def test_export_refuses_a_global_window_shorter_than_the_context(tmp_path):
    with pytest.raises(ValueError, match="global_window"):
        hf_config(get_preset("tiny", global_window=1024), bos_id=0, eos_ids=[1], pad_id=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    save_checkpoint(tmp_path / "ckpt", CWM(get_preset("debug")))
    assert main(["export-hf", str(tmp_path / "ckpt"), str(out)]) == 1


def hf_messages(messages):
    """Tool-call arguments as dicts, as transformers and vLLM hand them to templates."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {**c, "function": {**c["function"],
                                   "arguments": json.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]]
        out.append(message)
    return out


def test_exported_chat_template_renders_like_render_messages(exported):
    from cwm_model.chat import render_messages, render_text
    from tests.model.test_chat import CONVERSATION, TOOLS

    _, folder = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    for messages, tools in ((CONVERSATION, None), (CONVERSATION, TOOLS), (CONVERSATION[1:2], TOOLS),
                            (CONVERSATION[1:2], [weather, *TOOLS])):
        for prompt, think in ((False, False), (True, False), (True, True)):
            expected = render_text(render_messages(messages, tools=tools,
                                                   add_generation_prompt=prompt, think=think))
            got = hf_tok.apply_chat_template(hf_messages(messages), tools=tools,
                                             add_generation_prompt=prompt, tokenize=False,
                                             enable_thinking=think)
            assert got == expected
