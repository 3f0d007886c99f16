"""Streaming, packing, mixing and masking (pure logic; token ids come straight from records)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from cwm_jobs.data import (
    Document,
    MixedStream,
    PackedStream,
    Position,
    RecordStream,
    collate,
    masked_lm_loss,
    observation_masked,
)
from cwm_spec.artifacts import ArtifactError, Manifest, join, write_manifest, write_shard


def make_dataset(root, name: str, docs: list[list[int]], shards: int = 3, corrupt: bool = False) -> str:
    uri = str(root / name)
    manifest = Manifest(kind="code")
    per = -(-len(docs) // shards)
    for i in range(shards):
        records = [{"ids": d, "n": i * per + j} for j, d in enumerate(docs[i * per:(i + 1) * per])]
        manifest.splits.setdefault("train", []).append(
            write_shard(uri, f"train-{i:05d}-of-{shards:05d}.jsonl", records)
        )
    if corrupt:
        path = join(uri, manifest.splits["train"][0].path)
        with open(path, "a") as f:
            f.write("{not json\n[1, 2]\n")
    write_manifest(uri, manifest)
    return uri


def ids_encoder(record, _position):
    ids = record["ids"]
    return Document(list(ids), [1] * len(ids))


@pytest.fixture
def docs():
    rng = torch.Generator().manual_seed(0)
    return [torch.randint(1, 100, (int(n),), generator=rng).tolist()
            for n in torch.randint(1, 30, (40,), generator=rng)]


def test_ranks_partition_the_records_and_order_is_seeded(tmp_path, docs):
    uri = make_dataset(tmp_path, "d", docs)
    one_epoch = lambda rank, world, seed=0: [r["n"] for _, r in RecordStream(  # noqa: E731
        uri, seed=seed, rank=rank, world=world, epochs=1).iterate()]
    r0, r1 = one_epoch(0, 2), one_epoch(1, 2)
    assert not set(r0) & set(r1) and sorted(r0 + r1) == list(range(len(docs)))
    assert one_epoch(0, 1) == one_epoch(0, 1)
    assert one_epoch(0, 1, seed=0) != one_epoch(0, 1, seed=5)


def test_record_stream_resumes_at_a_position(tmp_path, docs):
    uri = make_dataset(tmp_path, "d", docs)
    stream = RecordStream(uri, rank=1, world=2)
    first = list(itertools.islice(stream.iterate(), 50))  # crosses into the second epoch
    position = first[17][0]
    resumed = list(itertools.islice(stream.iterate(position), 33))
    assert [r for _, r in resumed] == [r for _, r in first[17:]]


def test_corrupt_lines_are_counted_not_fatal(tmp_path, docs):
    uri = make_dataset(tmp_path, "d", docs, corrupt=True)
    stream = RecordStream(uri, epochs=1)
    assert len(list(stream.iterate())) == len(docs)
    assert stream.stats["corrupt_lines/code"] == 2


def test_a_split_without_records_is_a_clear_error(tmp_path):
    uri = make_dataset(tmp_path, "d", [[1, 2]], shards=1)
    with pytest.raises(ArtifactError, match="no readable records for rank 1 of 2"):
        next(RecordStream(uri, rank=1, world=2).iterate())
    with pytest.raises(ArtifactError, match="no shards"):
        RecordStream(uri, split="validation")


def test_packing_keeps_every_token_in_order_with_document_ids(tmp_path, docs):
    uri = make_dataset(tmp_path, "d", docs)
    records = RecordStream(uri, epochs=1)
    stream = PackedStream(records, ids_encoder, length=15)
    sequences = list(iter(stream.next, None))
    flat = [t for s in sequences for t in s.tokens]
    expected = [t for _, r in RecordStream(uri, epochs=1).iterate() for t in r["ids"]]
    assert all(len(s.tokens) == 16 for s in sequences)
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 16
    for s in sequences:  # piece ids count up, positions restart in each piece
        assert s.doc_ids == sorted(s.doc_ids) and s.doc_ids[0] == 0
        for a, b, pa, pb in zip(s.doc_ids, s.doc_ids[1:], s.positions, s.positions[1:]):
            assert pb == (pa + 1 if a == b else 0)


def test_packed_stream_resumes_exactly(tmp_path, docs):
    uri = make_dataset(tmp_path, "d", docs)
    stream = PackedStream(RecordStream(uri, rank=0, world=2), ids_encoder, length=7)
    states, sequences = [], []
    for _ in range(60):  # several epochs of this rank's half
        states.append(stream.state())
        sequences.append(stream.next().tokens)
    for k in (0, 1, 13, 42):
        resumed = PackedStream(RecordStream(uri, rank=0, world=2), ids_encoder, 7, state=states[k])
        assert [resumed.next().tokens for _ in range(60 - k)] == sequences[k:]


def test_mixture_follows_weights_and_resumes(tmp_path, docs):
    a = make_dataset(tmp_path, "a", docs)
    b = make_dataset(tmp_path, "b", [[1000 + t for t in d] for d in docs])

    def build(state=None):
        streams = {n: PackedStream(RecordStream(u, seed=1), ids_encoder, 7,
                                   state=state["sources"][n] if state else None)
                   for n, u in (("traces", a), ("code", b))}
        return MixedStream(streams, {"traces": 0.3, "code": 0.7}, seed=3, rank=0, state=state)

    mixed = build()
    drawn = Counter()
    outputs, states = [], []
    for _ in range(400):
        states.append(mixed.state())
        seq = mixed.next()
        drawn["code" if seq.tokens[0] >= 1000 else "traces"] += 1
        outputs.append(seq.tokens)
    assert 0.22 < drawn["traces"] / 400 < 0.38
    resumed = build(states[123])
    assert [resumed.next().tokens for _ in range(400 - 123)] == outputs[123:]


def test_collate_masks_targets_across_document_boundaries():
    from cwm_jobs.data import Packed

    seq = Packed(tokens=[1, 2, 3, 4, 5], mask=[1, 1, 0, 1, 1], doc_ids=[0, 0, 1, 1, 1],
                 positions=[0, 1, 0, 1, 2])
    batch = collate([seq])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4]]
    assert batch["targets"].tolist() == [[2, 3, 4, 5]]
    # target 3 starts a new document (and is masked anyway); 4 and 5 are in the loss
    assert batch["loss_mask"].tolist() == [[1.0, 0.0, 1.0, 1.0]]


def test_masked_loss_averages_over_masked_in_targets_only():
    logits = torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="none")
    expected = ce[mask.reshape(-1).bool()].mean()
    assert torch.allclose(masked_lm_loss(logits, targets, mask), expected)


def test_observation_masking_is_deterministic_at_the_configured_rate():
    flags = [observation_masked(0, Position(0, 0, n, n), 3, 0.5) for n in range(2000)]
    assert flags == [observation_masked(0, Position(0, 0, n, n), 3, 0.5) for n in range(2000)]
    assert 0.45 < sum(flags) / len(flags) < 0.55
    assert not any(observation_masked(0, Position(0, 0, n, n), 1, 0.0) for n in range(100))


@pytest.mark.gpu
def test_the_compiled_training_loss_equals_the_eager_one():
    from cwm_jobs.data import training_loss

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    logits = torch.randn(2, 256, 128_256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 128_256, (2, 256), device="cuda")
    mask = (torch.rand(2, 256, device="cuda") > 0.3).float()
    values, grads = [], []
    for fn in (masked_lm_loss, training_loss):
        logits.grad = None
        loss = fn(logits, targets, mask)
        loss.backward()
        values.append(loss.detach())
        grads.append(logits.grad.float())
    assert torch.allclose(values[0], values[1], rtol=1e-4)
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-2)


def test_read_shard_describes_the_bytes_as_written_and_creates_missing_ones(tmp_path):
    from cwm_spec.artifacts import read_shard

    rows = [{"id": "b", "text": "line\u2028sep \u00e9"}, {"id": "a", "n": 1}]
    written = write_shard(str(tmp_path), "train-00000-of-00001.jsonl", rows)
    assert read_shard(str(tmp_path), "train-00000-of-00001.jsonl") == (written, rows)
    empty, none = read_shard(str(tmp_path), "deadletter-00000-of-00001.jsonl")
    assert (empty.records, empty.bytes, none) == (0, 0, [])
    assert (tmp_path / "deadletter-00000-of-00001.jsonl").read_bytes() == b""
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{not json\n')
    with pytest.raises(ArtifactError, match="bad.jsonl: not JSON lines"):
        read_shard(str(tmp_path), "bad.jsonl")
