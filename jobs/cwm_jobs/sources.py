"""Which data each stage trains on, from the step's inputs and ``dataMix``.

``dataMix`` names three sources (CWM's mid-training mix): ``cwm`` (execution traces and
ForagerAgent trajectories, half each when both exist), ``code`` (the code corpus) and
``rehearsal`` (general text, ``inputs.rehearsal``: :mod:`cwm_jobs.rehearsal`; never the corpus
again). Each has its own validation loss (``validation_loss/<source>``). SFT turns the same data
sets into chat examples: output-prediction questions from traces, and trajectories with the loss
on the agent's turns. A question is taught in one of the two modes the evaluation measures, by a
hash of its trace (:func:`answers_directly`, half each): by reasoning (CWM's reasoning prompt,
the trace as the reasoning, then the value) or directly (no reasoning prompt, the value alone).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cwm_jobs.common import DistEnv, StepContext
from cwm_jobs.data import (
    Batcher,
    Document,
    Encoder,
    MixedStream,
    PackedStream,
    Position,
    RecordStream,
    chat_document,
    collate,
    text_document,
    trajectory_document,
)
from cwm_jobs.tasks import direct_messages, sft_messages, task_from_trace, trace_ids
from cwm_spec.artifacts import read_manifest


@dataclass(frozen=True)
class Source:
    """One weighted data source: a data set split read through an encoder."""

    name: str
    uri: str
    encode: Encoder
    weight: float


def _text(tokenizer: Any) -> Encoder:
    def encode(record: dict[str, Any], _position: Position) -> Document | None:
        text = record["text"]
        if not isinstance(text, str) or not text:
            return None
        return text_document(tokenizer, text)

    return encode


def _trace(tokenizer: Any) -> Encoder:
    """A trace record, its special tokens placed from its structure (cwm_jobs.tasks.trace_ids)."""
    def encode(record: dict[str, Any], _position: Position) -> Document | None:
        ids = trace_ids(tokenizer, record)
        return Document(ids, [1] * len(ids))

    return encode


def _trajectory(tokenizer: Any, seed: int, rate: float, assistant_only: bool) -> Encoder:
    def encode(record: dict[str, Any], position: Position) -> Document | None:
        return trajectory_document(tokenizer, record, position, seed=seed, mask_rate=rate,
                                   assistant_only=assistant_only)

    return encode


def answers_directly(text: str) -> bool:
    """Whether the SFT example of a trace answers directly (else by reasoning): half of the
    traces each, by a hash of the text, so a record is always taught the same way. Pure."""
    return hashlib.sha256(text.encode()).digest()[0] % 2 == 1


def _trace_question(tokenizer: Any) -> Encoder:
    def encode(record: dict[str, Any], _position: Position) -> Document | None:
        task = task_from_trace(record["text"], record.get("frames"))
        if task is None:
            return None
        direct = answers_directly(record["text"])
        return chat_document(tokenizer, direct_messages(task) if direct else sft_messages(task))

    return encode


def stage_sources(ctx: StepContext, tokenizer: Any) -> list[Source]:
    """The weighted sources of a pretrain, midtrain or SFT stage. A positive weight whose data
    set is not among the inputs is an error naming both."""
    s = ctx.settings
    assert s.data_mix is not None  # StageSpec's validator fills it from the stage's defaults
    mix = s.data_mix.model_dump()  # source -> weight
    sft = s.name == "sft"
    sources: list[Source] = []
    cwm_inputs = [n for n in ("traces", "trajectories") if ctx.input(n)]
    if mix.get("cwm", 0) > 0:
        if not cwm_inputs:
            raise ValueError(f"spec.dataMix.cwm is {mix['cwm']} but neither inputs.traces nor "
                             "inputs.trajectories is given")
        share = mix["cwm"] / len(cwm_inputs)
        if traces := ctx.input("traces"):
            enc = _trace_question(tokenizer) if sft else _trace(tokenizer)
            sources.append(Source("traces", traces, enc, share))
        if trajectories := ctx.input("trajectories"):
            enc = _trajectory(tokenizer, ctx.seed, s.observation_mask_rate, assistant_only=sft)
            sources.append(Source("trajectories", trajectories, enc, share))
    for name, given in (("code", "corpus"), ("rehearsal", "rehearsal")):
        if mix.get(name, 0) > 0:
            uri = ctx.input(given)
            if not uri:
                raise ValueError(f"spec.dataMix.{name} is {mix[name]} but inputs.{given} is not "
                                 "given")
            sources.append(Source(name, uri, _text(tokenizer), mix[name]))
    if not sources:
        raise ValueError("spec.dataMix selects no data")
    return sources


def make_batcher_factory(
    sources: list[Source], env: DistEnv, *, seed: int, length: int, micro_batch_size: int,
    split: str = "train",
) -> Callable[[dict[str, Any] | None], Batcher]:
    """A function from a saved data state (or None) to the stage's batcher."""

    def make(state: dict[str, Any] | None) -> Batcher:
        stats: Counter = Counter()
        streams = {}
        for src in sources:
            records = RecordStream(src.uri, split, seed=seed, rank=env.rank,
                                   world=env.world_size, stats=stats)
            sub = state["sources"].get(src.name) if state else None
            streams[src.name] = PackedStream(records, src.encode, length, state=sub)
        weights = {src.name: src.weight for src in sources}
        mixed = MixedStream(streams, weights, seed=seed, rank=env.rank, state=state)
        return Batcher(mixed, micro_batch_size, stats)

    return make


def validation_batches(sources: list[Source], env: DistEnv, *, seed: int, length: int,
                       micro_batch_size: int, max_sequences: int) -> list[dict[str, Any]]:
    """A fixed set of validation batches: each source's validation split read once, in order,
    up to ``max_sequences`` per source on this rank. Sources without one are left out."""
    batches = []
    for src in sources:
        if not read_manifest(src.uri).splits.get("validation"):
            continue
        records = RecordStream(src.uri, "validation", seed=seed, rank=env.rank,
                               world=env.world_size, epochs=1)
        stream = PackedStream(records, src.encode, length)
        sequences: list[Any] = []
        while len(sequences) < max_sequences:
            seq = stream.next()
            if seq is None:
                break
            sequences.append(seq)
        for i in range(0, len(sequences), micro_batch_size):
            batches.append({"source": src.name, **collate(sequences[i:i + micro_batch_size])})
    return batches
