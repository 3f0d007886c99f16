"""Training data: manifest-driven streaming, packing with document ids, mixing, loss masks.

The path of one token from disk to the loss::

    data set (manifest + JSONL shards, local or fsspec URI)
      -> RecordStream   one rank's records, in a seeded per-epoch shard order, with positions
      -> encode_*       a record -> Document(tokens, loss mask)   (pure; None if corrupt)
      -> PackedStream   documents concatenated and cut into fixed-length sequences with doc ids
      -> MixedStream    several packed streams sampled by weight, sequence by sequence
      -> collate        tensors for the model: input_ids, targets, loss_mask, doc_ids, positions

Order is a pure function of (seed, rank, world size): every stream exposes ``state()`` (a small
JSON-able dict) and accepts it back, so a stage killed at any moment resumes with the same data
order from its last checkpoint without replaying what it had already consumed. Corrupt records
are skipped and counted (``stats``), never fatal.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch

from cwm_jobs.chat_tools import agent_tools
from cwm_model.chat import render_messages
from cwm_spec.artifacts import ArtifactError, join, read_manifest


def stable_random(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded by a hash of ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Position:
    """Where a record sits in one rank's stream: epoch, shard (in epoch order), line in shard."""

    epoch: int = 0
    shard: int = 0
    line: int = 0
    seen: int = 0  # lines read this epoch across all ranks' records (decides the owning rank)

    def to_json(self) -> list[int]:
        return [self.epoch, self.shard, self.line, self.seen]

    @classmethod
    def from_json(cls, data: Sequence[int]) -> Position:
        return cls(*map(int, data))


class RecordStream:
    """The records of one split of a data set that belong to this rank, endlessly (epochs).

    Epoch ``e`` visits the shards in a permutation seeded by ``(seed, e)``; line ``n`` of the
    epoch (counting every rank's lines) belongs to rank ``n % world``. ``iterate(start)`` resumes
    at a :class:`Position` by skipping lines, without parsing them.
    """

    def __init__(self, uri: str, split: str = "train", *, seed: int = 0, rank: int = 0,
                 world: int = 1, epochs: int | None = None, stats: Counter | None = None):
        self.uri, self.split, self.seed = uri, split, seed
        self.rank, self.world, self.epochs = rank, world, epochs
        self.stats = stats if stats is not None else Counter()
        manifest = read_manifest(uri)
        self.kind = manifest.kind
        self.shards = [s.path for s in manifest.splits.get(split, [])]
        if not self.shards and epochs is None:
            raise ArtifactError(f"{uri}: split {split!r} has no shards")

    def shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        stable_random("shards", self.seed, epoch).shuffle(order)
        return order

    def iterate(self, start: Position = Position()) -> Iterator[tuple[Position, dict[str, Any]]]:
        epoch, first_shard, skip, seen = start.epoch, start.shard, start.line, start.seen
        while self.epochs is None or epoch < self.epochs:
            yielded = False
            for index, shard in enumerate(self.shard_order(epoch)):
                if index < first_shard:
                    continue
                with fsspec.open(join(self.uri, shard), "r", encoding="utf-8") as f:
                    for line_no, line in enumerate(f):
                        if line_no < skip:
                            continue
                        owner, seen = seen % self.world, seen + 1
                        if owner != self.rank:
                            continue
                        record = self._parse(line)
                        if record is not None:
                            yielded = True
                            yield Position(epoch, index, line_no, seen - 1), record
                skip = 0
            whole_epoch = epoch > start.epoch or start == Position(start.epoch)
            if not yielded and whole_epoch and self.epochs is None:  # endless: would spin
                raise ArtifactError(
                    f"{self.uri}: split {self.split!r} has no readable records for rank "
                    f"{self.rank} of {self.world}"
                )
            epoch, first_shard, seen = epoch + 1, 0, 0

    def _parse(self, line: str) -> dict[str, Any] | None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            self.stats[f"corrupt_lines/{self.kind}"] += 1
            return None
        return record

# --------------------------------------------------------------------------- documents


@dataclass
class Document:
    """Token ids and a per-token loss weight (1: predict this token, 0: context only)."""

    tokens: list[int]
    mask: list[int]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.mask):
            raise ValueError("Document tokens and mask differ in length")


Encoder = Callable[[dict[str, Any], Position], "Document | None"]


def text_document(tokenizer: Any, text: str) -> Document:
    """``<|begin_of_text|> text <|end_of_text|>``, every token in the loss; ``text`` is ordinary
    text (a trace record goes through ``cwm_jobs.tasks.trace_ids``, which adds its tokens)."""
    ids = tokenizer.encode(text)
    if not ids or ids[0] != tokenizer.bos_id:
        ids = [tokenizer.bos_id, *ids]
    if ids[-1] != tokenizer.eos_id:
        ids.append(tokenizer.eos_id)
    return Document(ids, [1] * len(ids))


def segments_document(tokenizer: Any, segments: Sequence[Any], weight: Callable[[int, Any], int]) -> Document:
    """Concatenate rendered chat segments; ``weight(i, segment)`` gives each segment's loss flag."""
    tokens: list[int] = []
    mask: list[int] = []
    for index, segment in enumerate(segments):
        # A special segment is its token; any other text is ordinary (cwm_model.chat).
        ids = tokenizer.encode_parts([(segment.text, segment.special)])
        tokens += ids
        mask += [weight(index, segment)] * len(ids)
    return Document(tokens, mask)


AGENT_ROLES = frozenset({"assistant"})
OBSERVATION_ROLES = frozenset({"tool", "ipython", "environment"})


def observation_masked(seed: int, position: Position, index: int, rate: float) -> bool:
    """Whether observation segment ``index`` of the document at ``position`` is left out of the
    loss; a deterministic coin so a resumed run masks exactly the same tokens."""
    return stable_random("obs", seed, position.to_json(), index).random() < rate


def trajectory_document(tokenizer: Any, record: dict[str, Any], position: Position, *, seed: int,
                        mask_rate: float, assistant_only: bool = False) -> Document | None:
    """A ForagerAgent trajectory: agent and environment turns both predicted (CWM), each
    observation left out of the loss with probability ``mask_rate``; ``assistant_only`` (SFT)
    predicts the agent's turns only."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    segments = render_messages(messages, tools=record.get("tools") or agent_tools())

    def weight(index: int, segment: Any) -> int:
        if segment.role in AGENT_ROLES:
            return 1
        if assistant_only:
            return 0
        if segment.role in OBSERVATION_ROLES:
            return 0 if observation_masked(seed, position, index, mask_rate) else 1
        return 1

    doc = segments_document(tokenizer, segments, weight)
    if doc.tokens and doc.tokens[0] != tokenizer.bos_id:
        doc = Document([tokenizer.bos_id, *doc.tokens], [0, *doc.mask])
    return doc


def chat_document(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None) -> Document:
    """An SFT example: the loss covers the assistant turns only."""
    segments = render_messages(messages, tools=tools)
    doc = segments_document(tokenizer, segments, lambda _i, s: int(s.role in AGENT_ROLES))
    if doc.tokens and doc.tokens[0] != tokenizer.bos_id:
        doc = Document([tokenizer.bos_id, *doc.tokens], [0, *doc.mask])
    return doc


# --------------------------------------------------------------------------- packing


@dataclass
class Packed:
    """One packed training sequence of ``length + 1`` tokens (inputs and shifted targets)."""

    tokens: list[int]
    mask: list[int]
    doc_ids: list[int]
    positions: list[int]


class PackedStream:
    """Documents from ``records`` concatenated and cut into sequences of ``length + 1`` tokens.

    A document that does not fit continues in the next sequence. ``state()`` is the position of
    the document the next sequence starts in and the offset into it: enough to resume exactly.
    """

    def __init__(self, records: RecordStream, encode: Encoder, length: int,
                 state: Mapping[str, Any] | None = None):
        self.records, self.encode, self.length = records, encode, length
        self.stats = records.stats
        start = Position.from_json(state["position"]) if state else Position()
        self._iter = records.iterate(start)
        self._doc: tuple[Position, Document] | None = None
        self._offset = 0
        if state:
            self._next_doc()
            if self._doc is None or self._doc[0] != start:
                raise ValueError(f"{records.uri}: resume position {start} not found (data set changed?)")
            self._offset = int(state["offset"])

    def _next_doc(self) -> None:
        """Advance to the next usable document; unusable records are counted and skipped, but a
        whole epoch of them is an error (the data set is not what this stage expects)."""
        first_rejected: Position | None = None
        for position, record in self._iter:
            doc, reason = self._encode(record, position)
            if doc is not None:
                self.stats[f"documents/{self.records.kind}"] += 1
                self._doc, self._offset = (position, doc), 0
                return
            self.stats[f"corrupt_records/{self.records.kind}"] += 1
            self.stats[f"corrupt_reason/{reason}"] += 1
            first_rejected = first_rejected or position
            if position.epoch > first_rejected.epoch and position.seen >= first_rejected.seen:
                raise ArtifactError(
                    f"{self.records.uri}: no usable {self.records.kind} record in a whole epoch "
                    f"(last problem: {reason})"
                )
        self._doc = None

    def _encode(self, record: dict[str, Any], position: Position) -> tuple[Document | None, str]:
        try:
            doc = self.encode(record, position)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            return None, type(err).__name__
        if doc is None or not doc.tokens:
            return None, "unusable"
        return doc, ""

    def state(self) -> dict[str, Any]:
        if self._doc is None:
            self._next_doc()
        if self._doc is None:
            return {"position": Position(10**9).to_json(), "offset": 0}
        return {"position": self._doc[0].to_json(), "offset": self._offset}

    def next(self) -> Packed | None:
        """The next sequence, or None when a finite stream runs out (a partial tail is dropped)."""
        need = self.length + 1
        out = Packed([], [], [], [])
        piece = 0
        while need:
            if self._doc is None or self._offset >= len(self._doc[1].tokens):
                self._next_doc()
                if self._doc is None:
                    return None
            doc = self._doc[1]
            take = min(need, len(doc.tokens) - self._offset)
            out.tokens += doc.tokens[self._offset:self._offset + take]
            out.mask += doc.mask[self._offset:self._offset + take]
            out.doc_ids += [piece] * take
            out.positions += list(range(take))
            self._offset += take
            need -= take
            piece += 1
        return out


class MixedStream:
    """Several packed streams sampled by weight, one choice per sequence.

    Choice ``k`` depends only on ``(seed, rank, k)``, so the mix is reproducible and resumable.
    """

    def __init__(self, streams: Mapping[str, PackedStream], weights: Mapping[str, float], *,
                 seed: int, rank: int, state: Mapping[str, Any] | None = None):
        names = [n for n in sorted(streams) if weights.get(n, 0) > 0]
        if not names:
            raise ValueError("data mix: no source with a positive weight has data")
        total = sum(weights[n] for n in names)
        self.names = names
        self.cumulative = [sum(weights[m] for m in names[: i + 1]) / total for i in range(len(names))]
        self.streams, self.seed, self.rank = dict(streams), seed, rank
        self.count = int(state["count"]) if state else 0
        self.drawn: Counter = Counter()

    def choose(self, k: int) -> str:
        u = stable_random("mix", self.seed, self.rank, k).random()
        for name, edge in zip(self.names, self.cumulative):
            if u < edge:
                return name
        return self.names[-1]

    def next(self) -> Packed:
        name = self.choose(self.count)
        self.count += 1
        self.drawn[name] += 1
        sequence = self.streams[name].next()
        if sequence is None:
            raise ArtifactError(f"data source {name!r} ran out (streams are endless unless epochs are set)")
        return sequence

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "sources": {n: s.state() for n, s in self.streams.items()}}


def collate(sequences: Sequence[Packed]) -> dict[str, torch.Tensor]:
    """Stack sequences into model inputs.

    Target ``t`` is token ``t + 1``; it is in the loss when that token's mask is set and it
    belongs to the same document piece as the input token (no predicting across a boundary).
    """
    tokens = torch.tensor([s.tokens for s in sequences], dtype=torch.long)  # (B, T+1)
    mask = torch.tensor([s.mask for s in sequences], dtype=torch.float32)
    docs = torch.tensor([s.doc_ids for s in sequences], dtype=torch.long)
    positions = torch.tensor([s.positions for s in sequences], dtype=torch.long)
    same_doc = (docs[:, 1:] == docs[:, :-1]).float()
    return {
        "input_ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": mask[:, 1:] * same_doc,  # (B, T)
        "doc_ids": docs[:, :-1],
        "positions": positions[:, :-1],
    }


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked-in targets (0 if a batch has none)."""
    losses = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    )  # (B*T,)
    mask = mask.reshape(-1).to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


_compiled_loss: Any = None


def training_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`masked_lm_loss`, compiled on CUDA into fused kernels that read the bf16 logits and
    never materialise the float32 logits and log-probabilities (tokens x vocabulary each: at
    CWM's 128k vocabulary the largest tensors of a training step). Training batches have one
    shape per stage, so it compiles once."""
    if logits.device.type != "cuda":
        return masked_lm_loss(logits, targets, mask)
    global _compiled_loss
    if _compiled_loss is None:
        _compiled_loss = torch.compile(masked_lm_loss, dynamic=False)
    return _compiled_loss(logits, targets, mask)


@dataclass
class Batcher:
    """Micro-batches from a stream; its ``state()`` is the stream's."""

    stream: Any
    micro_batch_size: int
    stats: Counter = field(default_factory=Counter)

    def next(self) -> dict[str, torch.Tensor]:
        return collate([self.stream.next() for _ in range(self.micro_batch_size)])

    def state(self) -> dict[str, Any]:
        return self.stream.state()
