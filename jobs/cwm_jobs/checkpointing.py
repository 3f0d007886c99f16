"""Resumable DeepSpeed state and the final model checkpoint, saved so that a partial save is
never loaded.

Layout of a stage's ``outputs.state``::

    STATE/step00000050/...            DeepSpeed files (model, ZeRO partitions, optimizer, scheduler)
    STATE/step00000050/data-rank0.json  each rank's data-stream position
    STATE/latest.json                 {"tag": "step00000050", "step": 50, "worldSize": 2}

``latest.json`` is written last, atomically (temporary file + rename), by rank 0 after a barrier
that every rank reaches only once its files are written. A process killed during a save leaves
the previous ``latest.json`` in place, so the half-written tag is never read; the next save of
that step overwrites it. Object-store URIs are staged in a local folder and uploaded before
``latest.json`` is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch.distributed as dist

from cwm_jobs.common import DistEnv, default_cache_dir, write_json_atomic

LOG = logging.getLogger("cwm_jobs.checkpointing")
LATEST = "latest.json"
KEEP = 2  # resumable states kept (the newest and one before it)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def staging_dir(uri: str, what: str) -> Path:
    """A local folder standing in for a remote ``uri`` (the same for every rank on a node)."""
    if is_local(uri):
        return local_path(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return default_cache_dir() / "staging" / f"{what}-{digest}"


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

    def __init__(self, uri: str, env: DistEnv):
        self.uri, self.env = uri.rstrip("/"), env
        self.local = staging_dir(self.uri, "state")
        self.remote = not is_local(self.uri)

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:08d}"

    def latest(self) -> dict[str, Any] | None:
        """The last complete save, or None."""
        fs, path = fsspec.core.url_to_fs(f"{self.uri}/{LATEST}")
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError:
                raise ValueError(f"{self.uri}/{LATEST}: not valid JSON") from None

    def save(self, engine: Any, step: int, data_state: dict[str, Any], extra: dict[str, Any]) -> None:
        tag = self.tag(step)
        # DeepSpeed writes module/optimizer/scheduler state (every rank its ZeRO partition).
        engine.save_checkpoint(str(self.local), tag=tag, client_state={"cwm": extra},
                               save_latest=False)
        write_json_atomic(self.local / tag / f"data-rank{self.env.rank}.json", data_state)
        barrier()
        if self.remote and self.env.local_rank == 0:
            fs, path = fsspec.core.url_to_fs(f"{self.uri}/{tag}")
            fs.put(str(self.local / tag), path, recursive=True)
        barrier()
        if self.env.is_main:
            latest = {"tag": tag, "step": step, "worldSize": self.env.world_size}
            if self.remote:
                with fsspec.open(f"{self.uri}/{LATEST}", "w") as f:
                    json.dump(latest, f)
            else:
                write_json_atomic(self.local / LATEST, latest)
            self._prune(keep={tag})
        barrier()

    def _prune(self, keep: set[str]) -> None:
        """Delete all but the newest ``KEEP`` tags (never the one ``latest.json`` names)."""
        fs, root = fsspec.core.url_to_fs(self.uri)
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
        tag = latest["tag"]
        if latest.get("worldSize") != self.env.world_size:
            raise ValueError(
                f"{self.uri}/{LATEST}: saved by {latest.get('worldSize')} processes, this run has "
                f"{self.env.world_size}; resume with the same world size or clear outputs.state"
            )
        if self.remote and self.env.local_rank == 0:
            fs, path = fsspec.core.url_to_fs(f"{self.uri}/{tag}")
            shutil.rmtree(self.local / tag, ignore_errors=True)
            (self.local / tag).mkdir(parents=True, exist_ok=True)
            fs.get(path + "/", str(self.local / tag), recursive=True)
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
    """Write the consolidated model checkpoint (rank 0). ``cwm_model.checkpoint`` writes a hidden
    sibling folder and renames it into place; a remote URI is written locally, then uploaded."""
    from cwm_model.checkpoint import save_checkpoint

    if is_local(uri):
        save_checkpoint(local_path(uri), model, tokenizer, extra=extra)
        return
    staged = staging_dir(uri, "checkpoint")
    save_checkpoint(staged, model, tokenizer, extra=extra)
    fs, path = fsspec.core.url_to_fs(uri)
    fs.put(str(staged) + "/", path, recursive=True)
