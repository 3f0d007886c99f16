"""The rehearsal data set: general text, not code, for the stages' ``rehearsal`` source.

CWM rehearses its pre-training mix during mid-training (30% of the mix) so that learning
execution does not erase what pre-training taught. The default mid-training mix is CWM's (cwm 0.3
/ code 0.4 / rehearsal 0.3); pre-training is code only by default, and a pipeline that gives its
pretrain stage a ``rehearsal`` share (``examples/tiny.yaml`` does) rehearses text it pre-trained
on. The text must not be the code corpus read again, or "rehearsal" is only more code.

``python -m cwm_jobs.rehearsal --config step.json`` (or ``$CWM_STEP_CONFIG``) writes a data set
of kind ``text`` (records ``{"text", "topic", "sha256"}``) to ``outputs.dataset`` from the
natural-language documentation shipped with the Python interpreter itself: the Language
Reference topics of the standard library's ``pydoc_data`` (what ``help("assert")`` prints;
about 0.46 MB of English prose with grammar excerpts in CPython 3.11), cut into sections at
paragraph boundaries. Nothing is downloaded; the text is the Python Software Foundation's
documentation, under the PSF licence like the interpreter. The code corpus
(:mod:`cwm_jobs.corpus`) leaves ``pydoc_data`` out, so the two sources share no file. On a
cluster, ``spec.data.rehearsal.uri`` names any data set of kind ``text`` instead (a real
pre-training text mix), and this step does not run.

Validation: about 5% of the sections, chosen by content hash (at least one).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from cwm_spec.api import RehearsalSpec
from cwm_spec.artifacts import Manifest, write_manifest, write_shard
from cwm_spec.stepconfig import load_step_config, read_section

LOG = logging.getLogger("cwm_jobs.rehearsal")
SECTION_CHARS = 3000      # a section ends at the first paragraph break past this many characters
VALIDATION_PER_MILLE = 50


def documentation_topics() -> dict[str, str]:
    """The interpreter's Language Reference topics, ``{topic: text}``. A Python built without
    ``pydoc_data`` (some minimal distributions strip it) is an error saying what to do."""
    try:
        # Imported here: a 0.5 MB module of text, read once by this step and absent from some
        # minimal Pythons (the error below says what to do).
        from pydoc_data.topics import topics  # noqa: PLC0415
    except ImportError as err:
        raise RuntimeError(
            f"the rehearsal step reads the standard library's pydoc_data, which this Python "
            f"({sys.executable}) lacks ({err}): install the full standard library (Debian: "
            "libpython3-stdlib) or set spec.data.rehearsal.uri to a data set of kind text"
        ) from None
    return dict(topics)


def sections(text: str, limit: int = SECTION_CHARS) -> list[str]:
    """``text`` cut at paragraph breaks (blank lines) into pieces just over ``limit``
    characters; a piece is never cut inside a paragraph. Pure."""
    pieces, current = [], []
    size = 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= limit:
            pieces.append("\n\n".join(current).strip())
            current, size = [], 0
    if current:
        pieces.append("\n\n".join(current).strip())
    return [p for p in pieces if p]


def records_of(topics: Mapping[str, str]) -> list[dict[str, Any]]:
    """One record per section, in topic order; exact duplicates kept once. Pure."""
    seen: set[str] = set()
    records = []
    for topic in sorted(topics):
        for index, text in enumerate(sections(topics[topic])):
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                records.append({"text": text, "topic": f"{topic}#{index}", "sha256": digest})
    return records


def split_records(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Hold out ~5% by content hash (at least one section once there are 20). Pure."""
    train: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    for r in records:
        held = int(r["sha256"][:8], 16) % 1000 < VALIDATION_PER_MILLE
        (validation if held else train).append(r)
    if not validation and len(records) >= 20:
        validation.append(train.pop())
    return {"train": train, "validation": validation}


def build_rehearsal(out_uri: str, topics: Mapping[str, str]) -> Manifest:
    """Write the data set (one shard per split) and its manifest, last."""
    records = records_of(topics)
    if not records:
        raise ValueError("rehearsal: the documentation topics hold no text")
    splits = split_records(records)
    stats = Counter(topics=len(topics), sections=len(records),
                    bytes=sum(len(r["text"].encode()) for r in records))
    manifest = Manifest(kind="text", stats={
        **dict(stats), "source": "pydoc_data.topics (Python Language Reference)",
        "python": sys.version.split()[0], "licence": "PSF (the interpreter's documentation)"})
    for split, chosen in splits.items():
        if chosen:
            name = f"{split}-00000-of-00001.jsonl"
            manifest.splits[split] = [write_shard(out_uri, name, chosen)]
    write_manifest(out_uri, manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> Manifest:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, _ = load_step_config(argv)
    spec = read_section(RehearsalSpec, config["spec"], "spec")
    out = (config.get("outputs") or {}).get("dataset")
    if not out:
        raise ValueError("step configuration: outputs.dataset is required for the rehearsal step")
    if spec.uri:
        raise ValueError(f"spec.uri {spec.uri}: a given rehearsal data set is read by the stages "
                         "directly; the plan runs no rehearsal step for it")
    manifest = build_rehearsal(out, documentation_topics())
    LOG.info("rehearsal: %d train / %d validation sections, %s bytes of documentation -> %s",
             manifest.records("train"), manifest.records("validation"), manifest.stats["bytes"],
             out)
    return manifest


if __name__ == "__main__":
    main()
