"""Consolidated model checkpoints: a folder anyone can load with ``cwm_model`` alone.

Layout::

    CHECKPOINT/
      config.json        {"format": "cwm-checkpoint/v1", "model": ModelConfig.to_dict()}
      model.safetensors  weights, named as in cwm_model.model.CWM
      tokenizer.json     optional (so the folder also loads with CWMTokenizer.load)
      extra.json         optional free-form metadata (stage, step, metrics)

Writes are atomic: everything goes to a hidden sibling folder that is renamed into place, so a
crash never leaves a half-written checkpoint where a reader (the next stage) would find it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cwm_model.config import ModelConfig, read_json_file
from cwm_model.model import CWM
from cwm_model.tokenizer import CWMTokenizer

FORMAT = "cwm-checkpoint/v1"


def unwrap(model: torch.nn.Module) -> CWM:
    """The CWM inside DDP / DeepSpeed (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while not isinstance(model, CWM):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a cwm_model.model.CWM, got {type(model).__name__}")
        model = inner
    return model


def save_checkpoint(path: str | Path, model: torch.nn.Module,
                    tokenizer: CWMTokenizer | None = None, *,
                    extra: dict | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, ``extra``) to the folder ``path``, replacing it
    atomically."""
    model = unwrap(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu").contiguous().clone()
                 for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = {"format": FORMAT, "model": model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra is not None:
            (tmp / "extra.json").write_text(json.dumps(extra, indent=2, default=str))
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out first, then deleted."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def load_config(path: str | Path) -> ModelConfig:
    file = Path(path) / "config.json"
    data = read_json_file(file, "checkpoint config")
    if data.get("format") != FORMAT:
        raise ValueError(f"checkpoint config {file}: format {data.get('format')!r}, "
                         f"expected {FORMAT!r}")
    return ModelConfig.from_dict(data["model"])


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu"
                    ) -> tuple[CWM, CWMTokenizer | None, dict[str, Any]]:
    """Model (in eval mode, on ``device``), tokenizer if saved, and ``extra`` (else ``{}``)."""
    path = Path(path)
    config = load_config(path)
    weights = path / "model.safetensors"
    if not weights.exists():
        raise ValueError(f"checkpoint {path}: missing model.safetensors")
    with torch.device("meta"):
        model = CWM(config)
    try:
        model.load_state_dict(load_file(str(weights), device=str(device)), strict=True,
                              assign=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {weights} does not match its config.json: {err}") from None
    tokenizer = CWMTokenizer.load(path) if (path / "tokenizer.json").exists() else None
    extra_file = path / "extra.json"
    extra = json.loads(extra_file.read_text()) if extra_file.exists() else {}
    return model.eval(), tokenizer, extra
