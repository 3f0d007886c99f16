"""Resumable DeepSpeed state and the final model checkpoint, saved so that a partial save is
never loaded.

Layout of a stage's ``outputs.state``::

    STATE/step00000050/...            DeepSpeed files (model, ZeRO partitions, optimizer, scheduler)
    STATE/step00000050/data-rank0.json  each rank's data-stream position
    STATE/latest.json                 {"tag": "step00000050", "step": 50, "worldSize": 2,
                                       "fingerprint": "3f2a..."}

``latest.json`` is written last, atomically (:func:`cwm_spec.storage.write_json_atomic`), by
rank 0 after a barrier that every rank reaches only once its files are written. A process killed
during a save leaves the previous ``latest.json`` in place, so the half-written tag is never
read; the next save of that step overwrites it. DeepSpeed writes only local files: for an
object-store URI it writes a staging folder, which :func:`cwm_spec.storage.upload_tree` publishes
(each tag committed by its own marker) before ``latest.json`` names it; resuming downloads the
committed tag back.

State is resumed only by the step that saved it: ``latest.json`` records the step's fingerprint
(its configuration and its inputs' fingerprints, ``cwm_spec.plan``), and a run with another
fingerprint (more steps asked, a retrained upstream stage) deletes that state, says so in the
log, and starts at step 0, instead of continuing a model trained from inputs it no longer has.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from cwm_jobs.common import DistEnv
from cwm_model.checkpoint import save_checkpoint
from cwm_spec import storage
from cwm_spec.storage import is_remote, local_path, staging_dir, write_json_atomic

LOG = logging.getLogger("cwm_jobs.checkpointing")
LATEST = "latest.json"
KEEP = 2  # resumable states kept (the newest and one before it)


def is_local(uri: str) -> bool:
    return not is_remote(uri)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass(frozen=True)
class Resumed:
    step: int
    data_state: dict[str, Any] | None
    extra: dict[str, Any]


class StateStore:
    """Save and find the resumable state of one stage (see the module docstring)."""

    def __init__(self, uri: str, env: DistEnv, fingerprint: str | None = None):
        self.uri, self.env, self.fingerprint = uri.rstrip("/"), env, fingerprint
        self.local = staging_dir(self.uri, "state")
        self.remote = not is_local(self.uri)

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:08d}"

    def latest(self) -> dict[str, Any] | None:
        """The last complete save, or None."""
        uri = storage.join(self.uri, LATEST)
        try:
            text = storage.read_bytes(uri)
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{uri}: not valid JSON") from None

    def save(self, engine: Any, step: int, data_state: dict[str, Any], extra: dict[str, Any]) -> None:
        tag = self.tag(step)
        if self.remote:  # the staging folder may hold this tag from an earlier run of the URI
            if self.env.local_rank == 0:
                shutil.rmtree(self.local / tag, ignore_errors=True)
            barrier()
        # DeepSpeed writes module/optimizer/scheduler state (every rank its ZeRO partition).
        engine.save_checkpoint(str(self.local), tag=tag, client_state={"cwm": extra},
                               save_latest=False)
        write_json_atomic(self.local / tag / f"data-rank{self.env.rank}.json", data_state)
        barrier()
        if self.remote and self.env.local_rank == 0:
            storage.upload_tree(self.local / tag, storage.join(self.uri, tag))
        barrier()
        if self.env.is_main:
            latest = {"tag": tag, "step": step, "worldSize": self.env.world_size,
                      "fingerprint": self.fingerprint}
            write_json_atomic(storage.join(self.uri, LATEST), latest)
            self._prune(keep={tag})
        barrier()

    def clear(self) -> None:
        """Delete every saved state (``latest.json`` first, so no reader sees a tag half gone)."""
        if self.env.is_main:
            storage.remove(storage.join(self.uri, LATEST))
            fs, root = storage.filesystem(self.uri)
            for path in fs.ls(root, detail=False):
                name = path.rsplit("/", 1)[-1]
                if name.startswith("step"):
                    storage.remove(storage.join(self.uri, name))
        if self.remote and self.env.local_rank == 0:
            shutil.rmtree(self.local, ignore_errors=True)
        barrier()

    def _prune(self, keep: set[str]) -> None:
        """Delete all but the newest ``KEEP`` tags (never the one ``latest.json`` names)."""
        fs, root = storage.filesystem(self.uri)
        tags = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)
                      if p.rsplit("/", 1)[-1].startswith("step"))
        for old in tags[:-KEEP]:
            if old not in keep:
                fs.rm(f"{root}/{old}", recursive=True)
        if self.remote:
            for old in sorted(p.name for p in self.local.glob("step*"))[:-KEEP]:
                shutil.rmtree(self.local / old, ignore_errors=True)

    def load(self, engine: Any) -> Resumed | None:
        """Restore the engine from the last complete save; None when there is none."""
        latest = self.latest()
        if latest is None:
            return None
        saved_by = latest.get("fingerprint")
        if saved_by and self.fingerprint and saved_by != self.fingerprint:
            LOG.warning("%s: the resumable state at step %s was saved by another configuration of "
                        "this step (fingerprint %s, this run %s): deleting it, starting at step 0",
                        self.uri, latest.get("step"), saved_by, self.fingerprint)
            self.clear()
            return None
        if not saved_by:
            LOG.warning("%s/%s names no fingerprint (saved before fingerprints were recorded): "
                        "resuming it as this step's own", self.uri, LATEST)
        tag = latest["tag"]
        if latest.get("worldSize") != self.env.world_size:
            raise ValueError(
                f"{self.uri}/{LATEST}: saved by {latest.get('worldSize')} processes, this run has "
                f"{self.env.world_size}; resume with the same world size or clear outputs.state"
            )
        if self.remote and self.env.local_rank == 0:
            storage.download_tree(storage.join(self.uri, tag), self.local / tag)
        barrier()
        load_path, client = engine.load_checkpoint(str(self.local), tag=tag)
        if load_path is None:
            raise ValueError(f"{self.uri}/{tag}: DeepSpeed could not load this checkpoint")
        data_file = self.local / tag / f"data-rank{self.env.rank}.json"
        data_state = json.loads(data_file.read_text()) if data_file.exists() else None
        extra = (client or {}).get("cwm", {})
        LOG.info("resumed from %s/%s at step %d", self.uri, tag, latest["step"])
        return Resumed(int(latest["step"]), data_state, extra)


def save_final_checkpoint(uri: str, model: Any, tokenizer: Any, extra: dict[str, Any]) -> None:
    """Write the consolidated model checkpoint (rank 0) and commit it. ``cwm_model.checkpoint``
    writes a hidden sibling folder and renames it into place; a remote URI is written to a
    staging folder, then uploaded with its commit marker last."""
    staged = local_path(uri) if is_local(uri) else staging_dir(uri, "checkpoint")
    save_checkpoint(staged, model, tokenizer, extra=extra)
    storage.upload_tree(staged, uri)
