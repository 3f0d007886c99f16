"""The tokenizer step: train the byte-level BPE on the pipeline's own data, or adopt a given one.

``python -m cwm_jobs.tokenizer --config step.json`` writes ``outputs.tokenizer/tokenizer.json``.

* ``spec.uri`` set: load that ``tokenizer.json`` (a path or fsspec URI; ours or a Llama-3 one,
  whose reserved slots receive CWM's special names) and save it;
* otherwise train ``spec.vocabSize`` base tokens (CWM's 256 specials go above) on a sample of
  ``spec.sampleRecords`` records drawn round-robin from the inputs that exist: the code corpus,
  the rehearsal text, traces (their text; the special tokens written in it are taken out before
  training, by ``cwm_model.tokenizer.train_tokenizer``, since they are never encoded from text)
  and trajectories (rendered chat), so every kind of text the stages train on shapes the merges.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cwm_jobs.chat_tools import agent_tools
from cwm_model.chat import render_messages, render_text
from cwm_model.tokenizer import CWMTokenizer, train_tokenizer
from cwm_spec import storage
from cwm_spec.api import TokenizerSpec
from cwm_spec.artifacts import iter_records
from cwm_spec.stepconfig import load_step_config, read_section

LOG = logging.getLogger("cwm_jobs.tokenizer")
SOURCES = ("corpus", "rehearsal", "traces", "trajectories")


def record_text(kind: str, record: dict[str, Any]) -> str | None:
    """The text a record contributes to tokenizer training (None if it has none)."""
    if kind == "trajectories":
        messages = record.get("messages")
        if not isinstance(messages, list):
            return None
        try:
            return render_text(render_messages(messages, tools=record.get("tools") or agent_tools()))
        except ValueError:
            return None
    text = record.get("text")
    return text if isinstance(text, str) and text else None


def sample_texts(inputs: dict[str, str], limit: int) -> Iterator[str]:
    """Up to ``limit`` texts taken in turn from each input's train split."""
    def texts(kind: str) -> Iterator[str]:
        for record in iter_records(inputs[kind], "train"):
            text = record_text(kind, record)
            if text:
                yield text

    streams = [texts(name) for name in SOURCES if inputs.get(name)]
    produced = 0
    while streams and produced < limit:
        for stream in list(streams):
            text = next(stream, None)
            if text is None:
                streams.remove(stream)
                continue
            produced += 1
            yield text
            if produced >= limit:
                return


def adopt(uri: str):
    """Load a given tokenizer.json (local or fsspec URI)."""
    if not storage.is_remote(uri):
        return CWMTokenizer.load(storage.local_path(uri))
    source = uri.rstrip("/")
    if not source.endswith(".json"):
        source += "/tokenizer.json"
    try:
        payload = storage.read_bytes(source)
    except FileNotFoundError:
        raise ValueError(f"spec.uri {uri}: no tokenizer.json at {source}") from None
    with tempfile.TemporaryDirectory() as tmp:  # `tokenizers` reads local files only
        (Path(tmp) / "tokenizer.json").write_bytes(payload)
        return CWMTokenizer.load(tmp)


def build_tokenizer(spec: TokenizerSpec, inputs: dict[str, str]):
    if spec.uri:
        return adopt(spec.uri)
    if not any(inputs.get(n) for n in SOURCES):
        raise ValueError("tokenizer: none of inputs.corpus, inputs.traces, inputs.trajectories "
                         "is given, and spec.uri is empty: nothing to train on")
    texts = list(sample_texts(inputs, spec.sample_records))
    if not texts:
        raise ValueError(f"tokenizer: the inputs {sorted(inputs)} hold no text to train on")
    LOG.info("training a %d-token BPE on %d records", spec.vocab_size, len(texts))
    return train_tokenizer(texts, spec.vocab_size)


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, _ = load_step_config(argv)
    out = (config.get("outputs") or {}).get("tokenizer")
    if not out:
        raise ValueError("step configuration: outputs.tokenizer is required for the tokenizer step")
    spec = read_section(TokenizerSpec, config["spec"], "spec")
    tokenizer = build_tokenizer(spec, dict(config.get("inputs") or {}))
    staged = storage.staging_dir(out, "tokenizer")
    path = tokenizer.save(staged)
    storage.upload_tree(staged, out)  # committed: readers take it through storage.local_copy
    LOG.info("tokenizer: %d tokens -> %s", tokenizer.vocab_size, out)
    return path


if __name__ == "__main__":
    main()
