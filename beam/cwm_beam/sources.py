"""Where programs to trace come from (pure readers and generators; no execution here).

The bundled CRUXEval problems are a benchmark first: :func:`cruxeval_split` says which of them
the evaluation holds out (``spec.evaluation.cruxevalHeldOut``) and which a ``cruxeval`` trace
source may train on. Both the trace step and the evaluation call it, so they agree by
construction; problems whose programs are the same text stay on one side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from cwm_spec.programs import program_hash

CRUXEVAL_PROBLEMS = 800


def cruxeval_records() -> Iterator[dict[str, Any]]:
    """The bundled CRUXEval functions (MIT licence, ``cwm_beam/data/cruxeval``)."""
    path = resources.files("cwm_beam") / "data" / "cruxeval" / "cruxeval.jsonl"
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


@dataclass(frozen=True)
class CruxevalSplit:
    """The bundled problems, each on one side: ``evaluation`` (in a hash order, so the first N
    scored are a spread of the benchmark, not its first lines) and ``trainable`` (in file
    order)."""

    evaluation: tuple[dict[str, Any], ...]
    trainable: tuple[dict[str, Any], ...]


def _order(digest: str) -> str:
    """The held-out order: a salted hash of the program hash, so that which problems are held
    out is independent of the train/validation split (``split_of`` reads the hash itself)."""
    return hashlib.sha256(f"cruxeval-evaluation:{digest}".encode()).hexdigest()


def cruxeval_split(held_out: int, records: list[dict[str, Any]] | None = None) -> CruxevalSplit:
    """Hold out the ``held_out`` problems first in a hash order of their programs (salted,
    :func:`_order`), and with them every problem whose program has the same hash (so a program
    is never on both sides: the held-out side may hold a few more than asked). Pure given
    ``records`` (default: the bundled ones)."""
    records = list(cruxeval_records()) if records is None else records
    if not 0 <= held_out <= len(records):
        raise ValueError(f"evaluation.cruxevalHeldOut {held_out}: must be within 0..{len(records)}")
    ordered = sorted(records, key=lambda r: (_order(program_hash(r["code"])), str(r["id"])))
    reserved = {program_hash(r["code"]) for r in ordered[:held_out]}
    evaluation = tuple(r for r in ordered if program_hash(r["code"]) in reserved)
    trainable = tuple(r for r in records if program_hash(r["code"]) not in reserved)
    return CruxevalSplit(evaluation, trainable)
