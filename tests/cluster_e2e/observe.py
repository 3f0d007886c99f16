"""Reading what happened on the cluster and on the volume (pure helpers and small readers)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cwm_operator.reconcile import parse_time


def metrics_losses(path: Path) -> dict[int, float]:
    """step → loss of a stage's ``metrics.jsonl`` (a resumed run's last record of a step wins)."""
    losses: dict[int, float] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "loss" in record:
                losses[int(record["step"])] = float(record["loss"])
    return losses


def metrics_steps(path: Path) -> list[int]:
    """The step numbers in the order the records were written (a resume repeats some)."""
    return [int(json.loads(line)["step"]) for line in path.read_text().splitlines() if line.strip()]


def prometheus_samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric family's samples in Prometheus' text format."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if match:
            out[match.group(1) or ""] = float(match.group(2))
    return out


def handoffs(children: list[dict[str, Any]], order: list[str]) -> list[float]:
    """Seconds from each step's child completing (its completionTime) to the next step's child
    being created, from the objects' own timestamps (one-second resolution)."""
    by_step = {c["metadata"]["labels"]["cwm.dev/step"]: c for c in children}
    gaps = []
    for before, after in zip(order, order[1:]):
        done = parse_time((by_step[before].get("status") or {}).get("completionTime"))
        created = parse_time(by_step[after]["metadata"]["creationTimestamp"])
        if done and created:
            gaps.append((created - done).total_seconds())
    return gaps
