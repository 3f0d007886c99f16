"""Data sets on disk or in object storage: a folder with ``manifest.json`` and JSONL shards.

Every data-producing step (the Beam trace and trajectory pipelines, the pretraining corpus) writes
this layout, and every consumer (training data loaders, evaluation) reads it through this module,
so local paths and ``s3://``/``gs://`` URIs behave the same (fsspec)::

    DIR/manifest.json
    DIR/train-00000-of-00004.jsonl ...
    DIR/validation-00000-of-00001.jsonl
    DIR/deadletter-00000-of-00001.jsonl      (records that failed, with a "reason")

``manifest.json``::

    {"format": "cwm-dataset/v1", "kind": "traces",
     "splits": {"train": [{"path": "train-00000-of-00004.jsonl", "records": 812,
                           "bytes": 1048576, "sha256": "..."}, ...],
                "validation": [...], "deadletter": [...]},
     "stats": {...free-form counters...},
     "programs": {"train": ["<program hash>", ...], "validation": [...]}}

``programs`` (data sets of programs: traces, trajectories) lists, per split, the
:func:`cwm_spec.programs.program_hash` of every program its records hold, sorted: what the
evaluation checks its own programs against before scoring (:mod:`cwm_spec.programs`).

Record shapes by kind: ``traces`` records carry ``"text"`` (the CWM trace text with special
tokens written out) plus structured fields; ``trajectories`` records carry ``"messages"``
(OpenAI-style chat messages with tool calls) and ``"meta"``; ``code`` records carry ``"text"``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from cwm_spec import storage

FORMAT = "cwm-dataset/v1"
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """A data set is missing, malformed or corrupt; the message names the file."""


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the data set folder
    records: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    kind: str
    splits: dict[str, list[Shard]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    programs: dict[str, list[str]] = field(default_factory=dict)  # split -> program hashes

    def records(self, split: str) -> int:
        return sum(s.records for s in self.splits.get(split, []))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "splits": {
                name: [vars(s) for s in shards] for name, shards in sorted(self.splits.items())
            },
            "stats": self.stats,
            "programs": {name: sorted(set(hashes))
                         for name, hashes in sorted(self.programs.items())},
        }

    @classmethod
    def from_json(cls, data: Any, origin: str) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(f"{origin}: not a {FORMAT} manifest")
        try:
            splits = {
                name: [Shard(**shard) for shard in shards]
                for name, shards in data["splits"].items()
            }
            programs = {name: list(hashes) for name, hashes in data.get("programs", {}).items()}
            return cls(kind=data["kind"], splits=splits, stats=data.get("stats", {}),
                       programs=programs)
        except (KeyError, TypeError) as err:
            raise ArtifactError(f"{origin}: malformed manifest ({err})") from None


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def sha256_file(uri: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(dir_uri: str, name: str, records: list[dict[str, Any]]) -> Shard:
    """Write one JSONL shard and describe it (records, bytes, checksum)."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    fs, path = fsspec.core.url_to_fs(join(dir_uri, name))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(payload)
    return Shard(name, len(records), len(payload), hashlib.sha256(payload).hexdigest())


def read_shard(dir_uri: str, name: str) -> tuple[Shard, list[dict[str, Any]]]:
    """Describe a shard as written (records, bytes, checksum of its bytes) and return its
    records, read once; a shard nobody wrote (a split that got no records) is written empty."""
    uri = join(dir_uri, name)
    try:
        with fsspec.open(uri, "rb") as f:
            payload = f.read()
    except FileNotFoundError:
        return write_shard(dir_uri, name, []), []
    try:
        records = [json.loads(line) for line in payload.split(b"\n") if line.strip()]
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{uri}: not JSON lines ({err})") from None
    return Shard(name, len(records), len(payload), hashlib.sha256(payload).hexdigest()), records


def write_manifest(dir_uri: str, manifest: Manifest) -> None:
    """Write the manifest last, atomically (:func:`cwm_spec.storage.write_json_atomic`: a
    renamed temporary file locally, one PUT on an object store): its presence marks the data set
    complete."""
    storage.write_json_atomic(join(dir_uri, MANIFEST), manifest.to_json())


def read_manifest(dir_uri: str) -> Manifest:
    uri = join(dir_uri, MANIFEST)
    try:
        data = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise ArtifactError(f"{uri}: no manifest (data set missing or incomplete)") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{uri}: not valid JSON ({err})") from None
    return Manifest.from_json(data, uri)


def verify(dir_uri: str) -> Manifest:
    """Check that every shard exists with its recorded size and checksum."""
    manifest = read_manifest(dir_uri)
    for shards in manifest.splits.values():
        for shard in shards:
            uri = join(dir_uri, shard.path)
            try:
                actual = sha256_file(uri)
            except FileNotFoundError:
                raise ArtifactError(f"{uri}: shard listed in the manifest is missing") from None
            if actual != shard.sha256:
                raise ArtifactError(f"{uri}: checksum mismatch (corrupt or modified shard)")
    return manifest


def iter_records(dir_uri: str, split: str = "train") -> Iterator[dict[str, Any]]:
    """Yield the records of one split in shard order. A line that is not a JSON object is
    skipped (callers count what they skip by comparing with the manifest)."""
    manifest = read_manifest(dir_uri)
    for shard in manifest.splits.get(split, []):
        with fsspec.open(join(dir_uri, shard.path), "r", encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    yield record


# ------------------------------------------------------------------------------------------
# Data sets written in parts (one per pod of an Indexed Job; see cwm_beam.parts)

PARTS = "parts"


def part_dir(dir_uri: str, index: int) -> str:
    """Where part ``index`` writes its own complete data set."""
    return join(dir_uri, PARTS, f"part-{index:05d}")


def discard_manifest(dir_uri: str) -> None:
    """Mark a data set incomplete again (a part about to be rewritten by a retried pod), so that
    no merge takes the previous attempt's part for this one's."""
    storage.remove(join(dir_uri, MANIFEST))


def merge_stats(values: list[Any]) -> Any:
    """The parts' stats as one: numbers summed, objects merged key by key, anything else kept
    when every part agrees and listed otherwise; a ``rate`` beside ``solved`` and ``episodes``
    is recomputed from them."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values)
    if all(isinstance(v, dict) for v in values):
        keys = sorted({k for v in values for k in v})
        out = {k: merge_stats([v[k] for v in values if k in v]) for k in keys}
        if {"rate", "solved", "episodes"} <= set(out):
            out["rate"] = out["solved"] / out["episodes"] if out["episodes"] else 0.0
        return out
    return values[0] if all(v == values[0] for v in values) else list(values)


def merge_parts(dir_uri: str, count: int) -> Manifest | None:
    """Once all ``count`` parts have their manifests, write the data set's own: every part's
    shards (paths under ``parts/``), split by split in part order, and their stats merged
    (counts summed, solve rates recomputed from the sums). Returns ``None`` while a part is
    missing.
    Idempotent, so the pods that finish last may all call it."""
    manifests = []
    for index in range(count):
        try:
            manifests.append(read_manifest(part_dir(dir_uri, index)))
        except ArtifactError:
            return None
    kinds = {m.kind for m in manifests}
    if len(kinds) != 1:
        raise ArtifactError(f"{dir_uri}: parts of different kinds {sorted(kinds)}")
    splits: dict[str, list[Shard]] = {}
    for index, manifest in enumerate(manifests):
        prefix = f"{PARTS}/part-{index:05d}/"
        for name, shards in manifest.splits.items():
            splits.setdefault(name, []).extend(
                Shard(prefix + s.path, s.records, s.bytes, s.sha256) for s in shards)
    stats = merge_stats([m.stats for m in manifests])
    stats["parts"] = count
    programs: dict[str, set[str]] = {}
    for manifest in manifests:
        for name, hashes in manifest.programs.items():
            programs.setdefault(name, set()).update(hashes)
    merged = Manifest(manifests[0].kind, splits, stats,
                      {name: sorted(hashes) for name, hashes in programs.items()})
    write_manifest(dir_uri, merged)
    return merged
