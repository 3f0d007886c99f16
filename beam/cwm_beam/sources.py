"""Where programs to trace come from (pure readers and generators; no execution here)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Iterator


def cruxeval_records() -> Iterator[dict[str, Any]]:
    """The bundled CRUXEval functions (MIT licence, ``cwm_beam/data/cruxeval``)."""
    path = resources.files("cwm_beam") / "data" / "cruxeval" / "cruxeval.jsonl"
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
