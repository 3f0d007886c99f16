"""Training metrics: JSONL (the record the tests and the runner read), TensorBoard, and a
progress display. Only rank 0 writes.

``outputs.metrics`` holds ``metrics.jsonl`` (one object per step, appended, so a resumed run
continues the file), ``tensorboard/`` and, at the end, ``eval.json`` (flat numbers that the
runner and the operator copy into the pipeline's status). A remote URI is staged locally and
uploaded by :meth:`MetricsLogger.sync`. In a pod, ``eval.json``'s numbers are also the
container's termination message (``/dev/termination-log``, which the kubelet creates): the
operator reads them from the master pod's status, because it cannot read the pipeline's volume.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from cwm_spec import storage
from cwm_spec.storage import is_remote, staging_dir, write_bytes_atomic, write_json_atomic

LOG = logging.getLogger("cwm_jobs.metrics")
#: Where the kubelet reads a container's termination message (its default
#: `terminationMessagePath`); absent outside a pod.
TERMINATION_LOG = Path("/dev/termination-log")
#: The kubelet keeps at most 4096 bytes of a termination message.
TERMINATION_LIMIT = 4096


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, uri: str, *, stage: str, total_steps: int, enabled: bool, every: int = 10,
                 resume_step: int | None = None):
        """``resume_step``: the step a resumed stage continues from (its metrics up to that step
        are kept, later ones dropped: they will be logged again); None for a stage starting at
        step 0, whose folder is emptied of an earlier run's metrics."""
        self.uri, self.stage, self.total, self.enabled = uri.rstrip("/"), stage, total_steps, enabled
        self.local = staging_dir(self.uri, "metrics")
        self.every = max(1, every)
        self._tb = None
        self._progress = None
        self._task = None
        self._start = time.time()
        if not enabled:
            return
        if resume_step is None:
            shutil.rmtree(self.local, ignore_errors=True)
        elif is_remote(self.uri):
            self._pull()
        self.local.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._keep_until(resume_step)
        self._jsonl = open(self.local / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (may be absent: see below)

            self._tb = SummaryWriter(str(self.local / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; degrade to JSONL only if absent
            LOG.warning("tensorboard is not installed: writing metrics.jsonl only")
        if sys.stderr.isatty():
            self._progress = Progress(TextColumn(f"{stage}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total} {task.description}"),
                                      TimeRemainingColumn())
            self._progress.start()
            self._task = self._progress.add_task("", total=total_steps)

    def _pull(self) -> None:
        """A resumed stage continues the metrics its earlier attempt published; anything else
        in the staging folder (an earlier run's, for the same URI) is dropped."""
        if storage.committed(self.uri) is not None:
            storage.download_tree(self.uri, self.local)
            return
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)

    def _keep_until(self, step: int) -> None:
        path = self.local / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_bytes_atomic(str(path), "".join(line + "\n" for line in kept).encode())

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "step": step, "time": round(time.time(), 3),
                  **{k: _clean(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{self.stage}/{key}", value, step)
        summary = " ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, float))
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, description=summary)
        elif step % self.every == 0 or step == self.total:
            LOG.info("%s step %d/%d %s", self.stage, step, self.total, summary)

    def sync(self) -> None:
        """Flush, and publish (a remote URI: upload, commit marker last)."""
        if not self.enabled:
            return
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
        if is_remote(self.uri):
            storage.upload_tree(self.local, self.uri)

    def write_eval(self, results: dict[str, float]) -> None:
        """``eval.json``: a flat object of numbers."""
        if not self.enabled:
            return
        flat = {k: _clean(float(v)) for k, v in results.items() if isinstance(v, (int, float))}
        write_json_atomic(self.local / "eval.json", flat)
        write_termination_message(flat)
        if self._tb is not None:
            for key, value in flat.items():
                if value is not None:
                    self._tb.add_scalar(f"{self.stage}/eval/{key}", value, self.total)
        self.sync()

    def close(self) -> None:
        if not self.enabled:
            return
        self.sync()
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()
        self.enabled = False


def write_termination_message(flat: dict[str, Any], path: Path = TERMINATION_LOG) -> bool:
    """The evaluation's numbers as the pod's termination message, when running in a pod (the
    kubelet created ``path``); a message over the kubelet's limit is not written, and logged."""
    if not path.exists():
        return False
    text = json.dumps(flat, sort_keys=True)
    if len(text.encode()) > TERMINATION_LIMIT:
        LOG.warning("eval.json (%d bytes) exceeds the %d-byte termination message: not written",
                    len(text.encode()), TERMINATION_LIMIT)
        return False
    path.write_text(text)
    return True


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; for a resumed run the last record of each step wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
