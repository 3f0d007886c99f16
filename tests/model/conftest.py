"""Shared fixtures for the model tests: a BPE tokenizer trained on real Python sources, and a
``debug`` model trained (seconds, on the CPU) to reproduce a chat reply with a tool call and a
code completion, so serving tests check real generations rather than canned ones."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import torch.nn.functional as F

from cwm_model.chat import encode_segments, render_messages
from cwm_model.checkpoint import save_checkpoint
from cwm_model.model import CWM
from cwm_model.presets import get_preset
from cwm_model.tokenizer import CWMTokenizer, train_tokenizer
from tests.model.memorised import (
    BASH_TOOL,
    CHAT_PROMPT,
    CHAT_REPLY,
    COMPLETION_PROMPT,
    COMPLETION_REPLY,
    THINK_PROMPT,
    THINK_REPLY,
)


def corpus() -> list[str]:
    import json.decoder
    import textwrap as tw

    return [inspect.getsource(json.decoder), inspect.getsource(tw), CHAT_REPLY, THINK_REPLY,
            COMPLETION_PROMPT + COMPLETION_REPLY] * 2


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning threads per process make
    small ops tens of times slower; one is both faster and steadier for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer() -> CWMTokenizer:
    return train_tokenizer(corpus(), vocab_size=512)


def memorise(model: CWM, sequences: list[list[int]], steps: int = 300) -> float:
    """Overfit ``model`` on ``sequences``, packed into one row with document ids and restarting
    positions (the training path the pipeline uses); returns the final loss."""
    inputs = torch.tensor([[t for s in sequences for t in s[:-1]]])
    targets = torch.tensor([t for s in sequences for t in s[1:]])
    doc_ids = torch.tensor([[d for d, s in enumerate(sequences) for _ in s[:-1]]])
    positions = torch.tensor([[p for s in sequences for p in range(len(s) - 1)]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss = torch.tensor(float("inf"))
    for _ in range(steps):
        loss = F.cross_entropy(model(inputs, doc_ids, positions)[0], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    return loss.item()


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, tokenizer):
    """A checkpoint folder whose model answers CHAT_PROMPT with CHAT_REPLY and completes
    COMPLETION_PROMPT with COMPLETION_REPLY under greedy decoding."""
    torch.manual_seed(0)
    model = CWM(get_preset("debug", vocab_size=tokenizer.vocab_size))
    chat, _ = encode_segments(tokenizer, render_messages(CHAT_PROMPT, tools=[BASH_TOOL],
                                                         add_generation_prompt=True))
    think, _ = encode_segments(tokenizer, render_messages(THINK_PROMPT, add_generation_prompt=True,
                                                          think=True))
    eot = [tokenizer.eot_id]
    sequences = [chat + tokenizer.encode(CHAT_REPLY) + eot,
                 think + tokenizer.encode(THINK_REPLY) + eot,
                 tokenizer.encode(COMPLETION_PROMPT + COMPLETION_REPLY, bos=True, eos=True)]
    with single_thread():
        loss = memorise(model, sequences)
    assert loss < 0.05, f"debug model did not memorise its sequences (loss {loss:.3f})"
    path = tmp_path_factory.mktemp("ckpt") / "trained"
    save_checkpoint(path, model, tokenizer, extra={"purpose": "serve test"})
    return path

