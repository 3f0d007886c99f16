"""Byte-level BPE tokenizer with CWM's special tokens at CWM's IDs.

CWM uses Llama-3's tokenizer: 128,000 BPE tokens, then 256 special slots (ids 128000-128255).
The named slots, from github.com/facebookresearch/cwm ``cwm/text/tokenizers.py``
(``TikTokenTokenizer`` / ``CWMInstructTokenizer.DEFAULT_TIKTOKEN_SPECIAL_TOKENS``, offsets above
the base vocabulary) and its ``PROMPTING_GUIDE.md``:

====== ========================== ======================================================
offset name                       use
====== ========================== ======================================================
0      <|begin_of_text|>          sequence start (BOS)
1      <|end_of_text|>            sequence end (EOS); ends a trace
4      <|pad|>                    padding
6, 7   <|start_header_id|>,       chat role header
       <|end_header_id|>          ``<|start_header_id|>ROLE<|end_header_id|>\\n\\n``
8      <|eom_id|>                 end of message (legacy, still a stop token)
9      <|eot_id|>                 end of turn: every CWM chat message ends with it
100-107 trace tokens              frame_sep, action_sep, return_sep, call_sep, line_sep,
                                  exception_sep, arg_sep, trace_context_start (MISSION.md)
120,121 <|reasoning_thinking_start|>, <|reasoning_thinking_end|>  reserved: CWM's think-token
                                  mode; the released model reasons in plain-text ``<think>``
====== ========================== ======================================================

Every other slot is ``<|reserved_special_token_{offset}|>``, as in CWM's code. Note: CWM's
``PROMPTING_GUIDE.md`` lists ``<|eot_id|>`` as 128008, but its tokenizer code (the source of truth
for the released weights, and Llama-3's layout) puts ``<|eom_id|>`` at 128008 and ``<|eot_id|>`` at
128009; we follow the code, and treat both as stop tokens as CWM does.

With a 128,000-token base the IDs are CWM's exactly; a smaller base (trained here on pipeline
data) keeps the same offsets: special ``name`` sits at ``base + offset``, total ``base + 256``.
The pre-tokenizer regex is Llama-3's (``DEFAULT_TIKTOKEN_PATTERN`` in the same file).

Special tokens come from structure only, as in CWM: its ``TikTokenTokenizer._encode`` uses
``encode_ordinary``, so text spelling ``<|eot_id|>`` or ``<|frame_sep|>`` (a traced string, a
tool's output, a commit message) is ordinary text. :meth:`CWMTokenizer.encode` does the same;
the separators are added by the code that knows the structure, through :meth:`encode_parts`
(``(text, is_special)`` pieces: ``cwm_exec.trace_format.trace_parts``, ``cwm_model.chat``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from cwm_model.config import read_json_file

CWM_BASE = 128_000
N_SPECIAL = 256
NAMED_SPECIALS: dict[str, int] = {
    "<|begin_of_text|>": 0,
    "<|end_of_text|>": 1,
    "<|pad|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "<|eom_id|>": 8,
    "<|eot_id|>": 9,
    "<|frame_sep|>": 100,
    "<|action_sep|>": 101,
    "<|return_sep|>": 102,
    "<|call_sep|>": 103,
    "<|line_sep|>": 104,
    "<|exception_sep|>": 105,
    "<|arg_sep|>": 106,
    "<|trace_context_start|>": 107,
    "<|reasoning_thinking_start|>": 120,
    "<|reasoning_thinking_end|>": 121,
}
_SPECIAL_TEXT = re.compile("|".join(re.escape(name) for name in NAMED_SPECIALS))
STOP_TOKENS = ("<|eom_id|>", "<|eot_id|>", "<|end_of_text|>")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def special_token_names() -> list[str]:
    """All 256 special names in slot order."""
    by_offset = {offset: name for name, offset in NAMED_SPECIALS.items()}
    return [by_offset.get(i, f"<|reserved_special_token_{i}|>") for i in range(N_SPECIAL)]


class CWMTokenizer:
    """A ``tokenizers.Tokenizer`` plus where CWM's special slots start (``base``)."""

    def __init__(self, tokenizer: Tokenizer, base: int):
        self.tokenizer = tokenizer
        self.base = base
        self.bos_id = base + NAMED_SPECIALS["<|begin_of_text|>"]
        self.eos_id = base + NAMED_SPECIALS["<|end_of_text|>"]
        self.pad_id = base + NAMED_SPECIALS["<|pad|>"]
        self.eot_id = base + NAMED_SPECIALS["<|eot_id|>"]  # ends every chat message
        # A copy that encodes special-token spellings as ordinary text (tiktoken's
        # encode_ordinary); ``tokenizer`` itself stays as saved, for transformers and vLLM.
        self._ordinary = Tokenizer.from_str(tokenizer.to_str())
        self._ordinary.encode_special_tokens = True
        for name, offset in NAMED_SPECIALS.items():
            found = tokenizer.token_to_id(name)
            if found != base + offset:
                raise ValueError(f"tokenizer: special token {name} has id {found}, "
                                 f"expected {base + offset} (base {base} + offset {offset})")

    # ------------------------------------------------------------------ ids of special tokens
    def token_id(self, name: str) -> int:
        """Id of a special (or any single) token, e.g. ``token_id("<|frame_sep|>")``."""
        found = self.tokenizer.token_to_id(name)
        if found is None:
            raise KeyError(f"tokenizer has no token {name!r}")
        return found

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    @property
    def stop_ids(self) -> list[int]:
        """What ends a chat reply or a document: eom, eot, end_of_text (CWM's ``stop_tokens``)."""
        return [self.token_id(name) for name in STOP_TOKENS]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> set[int]:
        return set(range(self.base, self.base + N_SPECIAL))

    # ----------------------------------------------------------------------- text <-> ids
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` as ordinary text: ``<|frame_sep|>`` written in ``text`` is
        encoded as the characters it is made of, never as the special token."""
        ids = self._ordinary.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text (ordinary text, no special tokens)."""
        return [e.ids for e in self._ordinary.encode_batch(list(texts), add_special_tokens=False)]

    def encode_parts(self, parts: Sequence[tuple[str, bool]]) -> list[int]:
        """Ids of ``(text, is_special)`` pieces: a special piece is one token named by its text
        (``KeyError`` if there is none), every other piece ordinary text."""
        texts = [text for text, special in parts if not special]
        encoded = iter(self.encode_batch(texts)) if texts else iter(())
        ids: list[int] = []
        for text, special in parts:
            if special:
                token = self.token_id(text)
                if not self.base <= token < self.base + N_SPECIAL:
                    raise KeyError(f"{text!r} is not a special token of this tokenizer")
                ids.append(token)
            else:
                ids += next(encoded)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    # -------------------------------------------------------------------------------- files
    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` (loadable by ``tokenizers`` and ``transformers``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        self.tokenizer.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CWMTokenizer:
        """Load a folder holding ``tokenizer.json``, or the file itself: ours, or a Llama-3
        ``tokenizer.json``, whose reserved slots are renamed to CWM's names by id."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        data = read_json_file(path, "tokenizer file")
        base = adopt_cwm_specials(data, origin=str(path))
        return cls(Tokenizer.from_str(json.dumps(data)), base)


def adopt_cwm_specials(data: dict, origin: str) -> int:
    """Give CWM's names to the special slots of a tokenizer.json document (in place).

    The base is the id of ``<|begin_of_text|>``. A slot already carrying the CWM name is kept; a
    slot holding another special token (Llama-3's ``<|reserved_special_token_95|>`` at 128100,
    ``<|finetune_right_pad_id|>`` at 128004, ...) is renamed; a missing slot is an error.
    """
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    by_name = {entry["content"]: entry["id"] for entry in added.values()}
    if "<|begin_of_text|>" not in by_name:
        raise ValueError(f"tokenizer file {origin}: no <|begin_of_text|> special token, so the "
                         "CWM special slots cannot be located")
    base = by_name["<|begin_of_text|>"]
    for name, offset in NAMED_SPECIALS.items():
        if name in by_name:
            if by_name[name] != base + offset:
                raise ValueError(f"tokenizer file {origin}: {name} has id {by_name[name]}, CWM "
                                 f"expects {base + offset}")
            continue
        entry = added.get(base + offset)
        if entry is None or not entry.get("special", False):
            raise ValueError(f"tokenizer file {origin}: no special slot at id {base + offset} "
                             f"for {name}")
        entry["content"] = name
    return base


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> CWMTokenizer:
    """Train byte-level BPE with ``vocab_size`` base tokens on ``texts``, then add CWM's 256
    special slots at ``vocab_size + offset``.

    A corpus too small to yield ``vocab_size`` merges is topped up with never-matching filler
    tokens, so the special ids, and the model's vocabulary size, depend only on ``vocab_size``.
    """
    if vocab_size < 256 + 1:
        raise ValueError(f"tokenizer vocab_size must exceed the 256 byte tokens, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Structural special tokens in the texts (trace records spell them out) are not text to
    # learn merges from: each becomes a line break.
    tokenizer.train_from_iterator((_SPECIAL_TEXT.sub("\n", text) for text in texts), trainer)
    shortfall = vocab_size - tokenizer.get_vocab_size(with_added_tokens=True)
    if shortfall > 0:
        # \x00-prefixed names never come out of byte-level pre-tokenization.
        tokenizer.add_tokens([AddedToken(f"\x00<|unused_{i}|>", special=True, normalized=False)
                              for i in range(shortfall)])
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False)
                                  for name in special_token_names()])
    return CWMTokenizer(tokenizer, base=vocab_size)
