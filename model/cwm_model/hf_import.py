"""Import a Hugging Face ``CwmForCausalLM`` folder (Meta's released CWM, or anything
``transformers`` writes for ``CwmConfig``) as a :mod:`cwm_model.checkpoint` folder.

The source is a folder or fsspec URI (read through :func:`cwm_spec.storage.filesystem`, so an
``s3://`` checkpoint is streamed, never assumed local) holding ``config.json``, ``tokenizer.json``
and the weights: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.

Streaming: the output ``model.safetensors`` is written without ever holding a tensor, let alone
the model, in memory. The shards' safetensors headers give every tensor's dtype, shape and byte
range; the output header is computed from them first (names mapped by
:func:`cwm_model.hf_export.cwm_name`, the same table the exporter reads forwards), then each
tensor's bytes are copied shard by shard in blocks of :data:`BLOCK` bytes. Dtypes are kept (a
bf16 release stays bf16), so ``cwm export-hf`` of the import gives back the same tensors bit for
bit. The weights take one block of memory at a time, whatever the model's size: measured in
docs/benchmarks.md ("Importing a Hugging Face checkpoint"), the whole process peaks at the same
~790 MiB for 3.8 to 6.6 GiB checkpoints at CWM-32B's width, interpreter and tokenizer included.

The shape comes from ``config.json``: Hugging Face's global (``full_attention``) layers attend to
the whole sequence, so ``global_window`` becomes ``max_position_embeddings`` (= ``max_seq_len``);
``layer_types`` must be a pattern :class:`ModelConfig` expresses (every k-th layer global,
optionally the last), else the import is refused naming the field.
"""

from __future__ import annotations

import json
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from cwm_model.checkpoint import FORMAT, replace_dir
from cwm_model.config import ModelConfig
from cwm_model.hf_export import cwm_name
from cwm_model.model import CWM
from cwm_model.tokenizer import CWMTokenizer
from cwm_spec import storage

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BLOCK = 16 << 20  # bytes copied at a time
DEFAULT_ROPE = {  # CwmConfig's defaults (transformers.models.cwm), used when config.json has none
    "rope_type": "llama3", "rope_theta": 1_000_000.0, "factor": 16.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}


# ------------------------------------------------------------------------------ config.json


def layer_pattern(layer_types: list[str], origin: str) -> tuple[int, bool]:
    """``(global_every, global_last_layer)`` reproducing ``layer_types`` exactly."""
    n = len(layer_types)
    wanted = [kind == "full_attention" for kind in layer_types]
    bad = sorted({k for k in layer_types if k not in ("full_attention", "sliding_attention")})
    if bad:
        raise ValueError(f"{origin}: layer_types holds {bad}; only full_attention and "
                         "sliding_attention exist in CWM")
    for every in range(1, n + 1):
        for last in (False, True):
            if [(last and i == n - 1) or i % every == 0 for i in range(n)] == wanted:
                return every, last
    raise ValueError(f"{origin}: layer_types {layer_types} is not 'every k-th layer global "
                     "(optionally the last too)', the only pattern cwm_model expresses")


def model_config_from_hf(cfg: dict[str, Any], origin: str) -> ModelConfig:
    """The :class:`ModelConfig` of a ``CwmConfig`` document (the inverse of ``hf_config``)."""
    def need(key: str) -> Any:
        if key not in cfg:
            raise ValueError(f"{origin}: required field {key} is missing")
        return cfg[key]

    if cfg.get("model_type") != "cwm":
        raise ValueError(f"{origin}: model_type is {cfg.get('model_type')!r}, expected 'cwm' "
                         "(a Hugging Face CwmForCausalLM checkpoint)")
    for key, expected in (("hidden_act", "silu"), ("mlp_bias", False),
                          ("tie_word_embeddings", False)):
        if cfg.get(key, expected) != expected:
            raise ValueError(f"{origin}: {key} is {cfg[key]!r}; CWM's is {expected!r}")
    layers = int(need("num_hidden_layers"))
    layer_types = cfg.get("layer_types") or [  # CwmConfig's default: every 4th layer global
        "full_attention" if i % 4 == 0 else "sliding_attention" for i in range(layers)]
    if len(layer_types) != layers:
        raise ValueError(f"{origin}: layer_types has {len(layer_types)} entries for "
                         f"num_hidden_layers {layers}")
    every, last = layer_pattern(list(layer_types), origin)
    rope: dict[str, Any] = cfg.get("rope_parameters") or cfg.get("rope_scaling") or DEFAULT_ROPE
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("llama3", "default"):
        raise ValueError(f"{origin}: rope_parameters.rope_type {rope_type!r} is not llama3")
    scaled = rope_type == "llama3"
    context = int(need("max_position_embeddings"))
    try:
        return ModelConfig(
            vocab_size=int(need("vocab_size")), dim=int(need("hidden_size")), n_layers=layers,
            n_heads=int(need("num_attention_heads")),
            n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]),
            ffn_dim=int(need("intermediate_size")), norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))),
            rope_factor=float(rope.get("factor", 1.0)) if scaled else 1.0,
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_context=int(rope.get("original_max_position_embeddings", 8192)),
            local_window=min(int(cfg.get("sliding_window") or context), context),
            global_window=context, global_every=every, global_last_layer=last,
            max_seq_len=context, init_std=float(cfg.get("initializer_range", 0.02)),
        )
    except ValueError as err:
        raise ValueError(f"{origin}: {err}") from None


# ------------------------------------------------------------------------------ the source


class Source:
    """A checkpoint folder, local or remote, read through ``cwm_spec.storage``."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = storage.filesystem(self.uri)

    def where(self, name: str) -> str:
        return storage.join(self.uri, name)

    def exists(self, name: str) -> bool:
        with storage.failures("read", self.where(name)):
            return bool(self.fs.exists(f"{self.root}/{name}"))

    def read_json(self, name: str) -> Any:
        if not self.exists(name):
            raise ValueError(f"Hugging Face checkpoint {self.uri}: no {name}")
        with storage.failures("read", self.where(name)):
            with self.fs.open(f"{self.root}/{name}", "rb") as f:
                payload = f.read()
        try:
            return json.loads(payload)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.where(name)}: not JSON ({err})") from None

    def open(self, name: str) -> BinaryIO:
        with storage.failures("read", self.where(name)):
            return self.fs.open(f"{self.root}/{name}", "rb")

    def shards(self) -> list[str]:
        """The weight files: the index's shards in order, or the one ``model.safetensors``."""
        if self.exists(INDEX):
            weight_map = self.read_json(INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{self.where(INDEX)}: no weight_map")
            return sorted(set(weight_map.values()))
        if self.exists(SINGLE):
            return [SINGLE]
        raise ValueError(f"Hugging Face checkpoint {self.uri}: neither {INDEX} nor {SINGLE}")


def read_header(f: BinaryIO, origin: str) -> tuple[int, dict[str, Any]]:
    """(offset where tensor data starts, header) of a safetensors file."""
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError(f"{origin}: not a safetensors file (shorter than 8 bytes)")
    (size,) = struct.unpack("<Q", raw)
    if size > 100 << 20:
        raise ValueError(f"{origin}: safetensors header of {size} bytes is implausible")
    try:
        header = json.loads(f.read(size))
    except json.JSONDecodeError as err:
        raise ValueError(f"{origin}: safetensors header is not JSON ({err})") from None
    header.pop("__metadata__", None)
    return 8 + size, header


@dataclass(frozen=True)
class Tensor:
    """One tensor to copy: where its bytes are in the source, what it is called in ours."""

    ours: str
    shard: str
    start: int  # absolute byte offset in the shard
    size: int
    dtype: str
    shape: list[int]


def plan_tensors(source: Source, expected: dict[str, list[int]]) -> list[Tensor]:
    """Every tensor of the source under our name, in shard order; refuses unknown, missing or
    misshapen tensors, naming them."""
    found: list[Tensor] = []
    for shard in source.shards():
        with source.open(shard) as f:
            data_start, header = read_header(f, source.where(shard))
        for theirs, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            try:
                ours = cwm_name(theirs)
            except KeyError as err:
                raise ValueError(f"{source.where(shard)}: {err.args[0]}") from None
            begin, end = entry["data_offsets"]
            if ours not in expected:
                raise ValueError(f"{source.where(shard)}: {theirs} is beyond config.json's shape")
            if list(entry["shape"]) != expected[ours]:
                raise ValueError(f"{source.where(shard)}: {theirs} has shape {entry['shape']}, "
                                 f"config.json implies {expected[ours]}")
            found.append(Tensor(ours, shard, data_start + begin, end - begin, entry["dtype"],
                                list(entry["shape"])))
    names = [t.ours for t in found]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    missing = sorted(set(expected) - set(names))
    if duplicated or missing:
        raise ValueError(f"Hugging Face checkpoint {source.uri}: "
                         + (f"tensors stored twice: {duplicated}" if duplicated else
                            f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}"))
    return found


def expected_shapes(config: ModelConfig) -> dict[str, list[int]]:
    """Our parameter names and shapes for ``config`` (a meta-device model: no memory)."""
    with torch.device("meta"):
        model = CWM(config)
    return {name: list(p.shape) for name, p in model.state_dict().items()}


# ------------------------------------------------------------------------------ writing


def write_weights(source: Source, tensors: list[Tensor], path: Path) -> int:
    """Stream ``tensors`` into one safetensors file at ``path``; returns its size."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.ours] = {"dtype": t.dtype, "shape": t.shape,
                          "data_offsets": [offset, offset + t.size]}
        offset += t.size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors does
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for shard in dict.fromkeys(t.shard for t in tensors):
            with source.open(shard) as f:
                for t in (t for t in tensors if t.shard == shard):
                    copy_range(f, out, t.start, t.size, source.where(shard))
    return 8 + len(encoded) + offset


def copy_range(f: BinaryIO, out: BinaryIO, start: int, size: int, origin: str) -> None:
    f.seek(start)
    left = size
    while left:
        block = f.read(min(BLOCK, left))
        if not block:
            raise ValueError(f"{origin}: ends before byte {start + size} (truncated shard)")
        out.write(block)
        left -= len(block)


def import_into(src: str, folder: Path) -> tuple[ModelConfig, CWMTokenizer]:
    """Convert ``src`` into the (new, empty) local ``folder``."""
    source = Source(src)
    hf = source.read_json("config.json")
    config = model_config_from_hf(hf, source.where("config.json"))
    if not source.exists("tokenizer.json"):
        raise ValueError(f"Hugging Face checkpoint {source.uri}: no tokenizer.json")
    with source.open("tokenizer.json") as f:
        (folder / "tokenizer.json").write_bytes(f.read())
    tokenizer = CWMTokenizer.load(folder)  # validates CWM's special slots
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{source.where('tokenizer.json')}: {tokenizer.vocab_size} tokens, more "
                         f"than config.json's vocab_size {config.vocab_size}")
    tokenizer.save(folder)  # CWM's names on the special slots (a Llama-3 file's are renamed)
    tensors = plan_tensors(source, expected_shapes(config))
    write_weights(source, tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"format": FORMAT, "model": config.to_dict()},
                                                   indent=2))
    extra = {"stage": "import-hf", "source": source.uri, "hf_config": hf}
    (folder / "extra.json").write_text(json.dumps(extra, indent=2))
    return config, tokenizer


def import_hf(src: str, out: str, *, replace: bool = False) -> tuple[ModelConfig, CWMTokenizer]:
    """Write the checkpoint at ``out`` (a folder or URI): locally into a hidden sibling renamed
    into place, remotely into a staging folder uploaded with its commit marker last. Without
    ``replace`` an existing non-empty ``out`` is refused."""
    remote = storage.is_remote(out)
    if not replace and (storage.exists(out) if remote else _non_empty(storage.local_path(out))):
        raise ValueError(f"import-hf output {out} exists and is not empty")
    if remote:
        staged = storage.staging_dir(out, "import")
        shutil.rmtree(staged, ignore_errors=True)
    else:
        target = storage.local_path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staged.mkdir(parents=True)
    try:
        result = import_into(src, staged)
        if not remote:
            replace_dir(staged, target)
        storage.upload_tree(target if not remote else staged, out)  # commit marker last
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return result


def _non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))
