"""One data step split over the pods of a Kubernetes Indexed Job.

With ``spec.data.beam.pods`` > 1 the operator runs a data step as an Indexed Job: every pod runs
the same pipeline on the in-process runner and keeps only its part of the work (programs by
program hash, repositories by position), writes a complete data set of its own under
``DIR/parts/part-NNNNN/``, and the last pod to finish merges the parts' manifests into
``DIR/manifest.json`` (:func:`cwm_spec.artifacts.merge_parts`). The part is read from the
flags ``--part``/``--parts``, else from ``JOB_COMPLETION_INDEX`` (set by Kubernetes) and
``CWM_PARTS`` (set by the operator).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"part {self.index} of {self.count}: need 0 <= part < parts")

    @property
    def split(self) -> bool:
        return self.count > 1

    def owns(self, key: str) -> bool:
        """Whether this part handles ``key`` (a stable hash, the same in every pod)."""
        digest = hashlib.sha256(key.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def owns_position(self, position: int) -> bool:
        return position % self.count == self.index


def job_part(index: int | None = None, count: int | None = None) -> Part:
    """This process's part: flags first, else the Indexed Job's environment, else the whole."""
    if count is None:
        count = int(os.environ.get("CWM_PARTS") or 1)
    if index is None:
        index = int(os.environ.get("JOB_COMPLETION_INDEX") or 0) if count > 1 else 0
    return Part(index, count)
