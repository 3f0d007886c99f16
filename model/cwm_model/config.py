"""The model's shape, as one validated dataclass.

Field names follow CWM's own ``TransformerArgs`` (github.com/facebookresearch/cwm,
``cwm/model/transformer.py``) where one exists, so a reader of the CWM report maps them directly.
Defaults are CWM-32B's dimensions (MISSION.md, "Model"); the presets in :mod:`cwm_model.presets`
derive smaller shapes from it. Pipeline specs write overrides in camelCase (``nLayers``):
:meth:`ModelConfig.from_dict` accepts both spellings.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def snake_case(name: str) -> str:
    """``nKvHeads`` -> ``n_kv_heads``; snake_case names pass through unchanged."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


@dataclass
class ModelConfig:
    """Shape of a CWM-style decoder. Every field is validated in ``__post_init__``."""

    vocab_size: int = 128_256
    """Rows of the (untied) input embedding and output projection; tokenizer total size."""
    dim: int = 6144
    """Residual stream width (Hugging Face: ``hidden_size``)."""
    n_layers: int = 64
    """Number of decoder blocks."""
    n_heads: int = 48
    """Query heads per attention layer."""
    n_kv_heads: int = 8
    """Key/value heads (grouped-query attention); must divide ``n_heads``."""
    head_dim: int = 128
    """Width of one attention head (CWM: 128, so ``n_heads * head_dim`` need not equal ``dim``)."""
    ffn_dim: int = 21_504
    """Hidden width of the SwiGLU feed-forward network."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 1_000_000.0
    """RoPE base frequency."""
    rope_factor: float = 1.0
    """Llama-3 RoPE scaling factor; 1.0 leaves frequencies unchanged (CWM pretraining), CWM uses 16
    from mid-training on."""
    rope_low_freq_factor: float = 1.0
    """Llama-3 scaling: wavelengths above ``rope_original_context / low`` are divided by the
    factor."""
    rope_high_freq_factor: float = 4.0
    """Llama-3 scaling: wavelengths below ``rope_original_context / high`` are left unchanged."""
    rope_original_context: int = 8192
    """Context length the unscaled RoPE was trained for (CWM: the 8k pretraining context)."""
    local_window: int = 8192
    """Tokens a local (sliding-window) layer sees, itself included."""
    global_window: int = 131_072
    """Tokens a global layer sees, itself included (CWM: 131,072 = the whole mid-training
    context)."""
    global_every: int = 4
    """Layers ``0, k, 2k, ...`` are global, the rest local: 4 gives CWM's 3 local : 1 global.
    1 makes every layer global."""
    global_last_layer: bool = True
    """Force the last layer to be global, as CWM's ``WindowAttentionArgs.global_last_layer``."""
    max_seq_len: int = 131_072
    """Longest sequence the model is meant for (sizes the generation cache; HF export's
    ``max_position_embeddings``)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes carried through checkpoints (never read by the model)."""

    def __post_init__(self) -> None:
        positive_ints = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                         "ffn_dim", "rope_original_context", "local_window", "global_window",
                         "global_every", "max_seq_len")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_kv_heads ({self.n_kv_heads}) must divide "
                             f"n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_factor < 1.0:
            raise ValueError(f"ModelConfig.rope_factor must be >= 1, got {self.rope_factor}")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError("ModelConfig.rope_high_freq_factor must exceed rope_low_freq_factor "
                             f"({self.rope_high_freq_factor} <= {self.rope_low_freq_factor})")
        if self.local_window > self.global_window:
            raise ValueError(f"ModelConfig.local_window ({self.local_window}) must not exceed "
                             f"global_window ({self.global_window})")
        if not isinstance(self.global_last_layer, bool):
            raise ValueError(f"ModelConfig.global_last_layer must be a bool, "
                             f"got {self.global_last_layer!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"ModelConfig.extra must be a dict, got {type(self.extra).__name__}")

    def is_global(self, layer: int) -> bool:
        """Whether ``layer`` attends over ``global_window`` (else ``local_window``)."""
        if self.global_last_layer and layer == self.n_layers - 1:
            return True
        return layer % self.global_every == 0

    def window(self, layer: int) -> int:
        return self.global_window if self.is_global(layer) else self.local_window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from snake_case or camelCase keys; unknown keys are an error naming them."""
        return cls(**normalize_fields(data))


def normalize_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Map camelCase keys to field names and reject any key that is not a field."""
    if not isinstance(data, dict):
        raise ValueError(f"model config must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {snake_case(key): value for key, value in data.items()}
    unknown = sorted(key for key in data if snake_case(key) not in names)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(names))})")
    return out


def read_json_file(file: Path, what: str) -> Any:
    """The JSON document in ``file``; a ``ValueError`` naming ``what`` and the file otherwise."""
    try:
        return json.loads(file.read_text())
    except OSError as err:
        raise ValueError(f"{what} {file}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {file}: not JSON ({err})") from None
