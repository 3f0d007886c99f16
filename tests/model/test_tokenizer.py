"""Tokenizer: CWM's special-token IDs, special text in input, round trips, Llama-3 tokenizer.json."""

from __future__ import annotations

import json

import pytest
from tokenizers import pre_tokenizers

from cwm_model.tokenizer import CWMTokenizer, train_tokenizer

# CWM's ids (facebookresearch/cwm cwm/text/tokenizers.py and MISSION.md), by name
CWM_IDS = {
    "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|pad|>": 128004,
    "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
    "<|eot_id|>": 128009, "<|frame_sep|>": 128100, "<|action_sep|>": 128101,
    "<|return_sep|>": 128102, "<|call_sep|>": 128103, "<|line_sep|>": 128104,
    "<|exception_sep|>": 128105, "<|arg_sep|>": 128106, "<|trace_context_start|>": 128107,
    "<|reasoning_thinking_start|>": 128120, "<|reasoning_thinking_end|>": 128121,
}


def test_special_tokens_sit_at_cwm_offsets_above_the_base(tokenizer):
    assert tokenizer.base == 512 and tokenizer.vocab_size == 512 + 256
    for name, cwm_id in CWM_IDS.items():
        assert tokenizer.token_id(name) == 512 + cwm_id - 128_000
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (512, 513, 516)
    assert tokenizer.token_id("<|reserved_special_token_2|>") == 514
    assert tokenizer.stop_ids == [520, 521, 513]


def test_special_text_is_ordinary_text_and_tokens_come_from_structure(tokenizer):
    """CWM's TikTokenTokenizer._encode is encode_ordinary: no special id from text, ever."""
    text = 'def f(x):\n    return x<|frame_sep|><|line_sep|>{"x": "1"}<|action_sep|><|eot_id|>'
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert not set(ids[1:-1]) & tokenizer.special_ids
    assert tokenizer.decode(ids) == "<|begin_of_text|>" + text + "<|end_of_text|>"
    parts = tokenizer.encode_parts([("x", False), ("<|frame_sep|>", True), ("<|frame_sep|>", False)])
    assert parts == [*tokenizer.encode("x"), tokenizer.token_id("<|frame_sep|>"),
                     *tokenizer.encode("<|frame_sep|>")]
    with pytest.raises(KeyError, match="not a special token"):
        tokenizer.encode_parts([("x", True)])
    unicode = "naïve → 数据 🙂\t\r\n"
    assert tokenizer.decode(tokenizer.encode(unicode)) == unicode


def test_small_corpus_is_topped_up_so_ids_depend_only_on_vocab_size():
    tok = train_tokenizer(["abc abc abd"], vocab_size=300)
    assert tok.token_id("<|frame_sep|>") == 400 and tok.vocab_size == 556
    assert tok.decode(tok.encode("abc<|pad|>")) == "abc<|pad|>"
    assert tok.token_id("<|pad|>") not in tok.encode("abc<|pad|>")


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    loaded = CWMTokenizer.load(tmp_path)
    text = "print('hi')<|eot_id|>"
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.base == tokenizer.base
    assert CWMTokenizer.load(tmp_path / "tokenizer.json").vocab_size == tokenizer.vocab_size


def llama3_tokenizer_json(base: int = 128_000) -> dict:
    """A tokenizer.json laid out like Meta's Llama-3 one: ``base`` BPE tokens, then 256 added
    special tokens named as Llama 3.1 names them, a BOS-adding post-processor."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["Ġt"] = len(vocab)  # two real merges, the rest unreachable filler
    vocab["Ġth"] = len(vocab)
    for i in range(len(vocab), base):
        vocab[f"<filler{i}>"] = i
    llama_names = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                   6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>",
                   9: "<|eot_id|>", 10: "<|python_tag|>"}
    added, reserved = [], 0
    for offset in range(256):
        name = llama_names.get(offset)
        if name is None:
            name, reserved = f"<|reserved_special_token_{reserved}|>", reserved + 1
        added.append({"id": base + offset, "content": name, "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": (
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "special_tokens": {"<|begin_of_text|>": {
                               "id": "<|begin_of_text|>", "ids": [base], "tokens": ["<|begin_of_text|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [["Ġ", "t"], ["Ġt", "h"]]},
    }


def test_llama3_tokenizer_json_loads_with_cwm_exact_ids(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(llama3_tokenizer_json()))
    tok = CWMTokenizer.load(path)
    assert tok.vocab_size == 128_256
    for name, cwm_id in CWM_IDS.items():
        assert tok.token_id(name) == cwm_id
    ids = tok.encode("<|trace_context_start|>x = 1<|frame_sep|>", bos=True)
    assert ids[0] == 128000 and not set(ids[1:]) & tok.special_ids  # text stays text
    assert tok.decode(ids) == "<|begin_of_text|><|trace_context_start|>x = 1<|frame_sep|>"


def test_a_non_ascii_trace_tokenises_to_cwm_ids_with_the_released_vocabulary(tmp_path):
    """Acceptance (issue 20): a traced program with non-ASCII strings, and values spelling
    every special token, tokenised with a 128,256-token vocabulary laid out as CWM's."""
    from cwm_exec.trace_format import split_trace, trace_parts
    from cwm_exec.tracer import trace_function
    from cwm_model.tokenizer import special_token_names

    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(llama3_tokenizer_json()))
    tok = CWMTokenizer.load(path)
    forged = "".join(special_token_names())
    source = f"def f(s):\n    t = 'ünïcödé ☃ ' + s\n    return t + {forged!r}"
    result = trace_function(source, "f", repr("wörld" + forged))
    context, complete = split_trace(result.text, result.frames)
    ids = tok.encode_parts(trace_parts(context, result.frames, complete=complete))
    specials = [i for i in ids if i >= 128_000]
    frame_ids = {"call": 128103, "line": 128104, "return": 128102, "exception": 128105}
    expected = [128000, 128107, 128100]
    for frame in result.frames:
        expected.append(frame_ids[frame.event])
        expected += [128101, 128100] if frame.event in ("call", "line") else [128101, 128106,
                                                                              128100]
    assert specials == expected + [128001]
    assert [f.event for f in result.frames] == ["call", "line", "line", "return"]
    assert "\\u00fcn\\u00efc\\u00f6d\\u00e9 \\u2603" in result.text   # json.dumps' escapes
    assert tok.decode(ids) == result.text


def test_bad_tokenizer_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="missing.json"):
        CWMTokenizer.load(tmp_path / "missing.json")
    data = llama3_tokenizer_json(base=300)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|begin_of_text|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="begin_of_text"):
        CWMTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)
