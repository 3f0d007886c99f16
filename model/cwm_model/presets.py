"""Named model sizes, each a small function deriving from the CWM-32B defaults.

``debug`` runs the unit tests, ``tiny`` is the local CPU default, ``cwm-32b`` is CWM's exact shape
(MISSION.md "Model": 64 layers, 6144 wide, FFN 21504, 48/8 heads of 128, vocab 128,256, local 8192 /
global 131072 windows 3:1, RoPE theta 1e6 scaled x16 Llama-3 style). Small vocabularies are the
tokenizer's base BPE size + 256 special slots (see :mod:`cwm_model.tokenizer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cwm_model.config import ModelConfig, normalize_fields
from cwm_model.model import CWM


def debug() -> ModelConfig:
    """Under 1M parameters: 4 layers (global, local, local, global-last), an 8-token local window,
    vocab = 512 BPE + 256 specials."""
    return ModelConfig(vocab_size=768, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                       ffn_dim=192, local_window=8, global_window=256, max_seq_len=256,
                       rope_original_context=256, rope_theta=10_000.0)


def tiny() -> ModelConfig:
    """About 10M parameters; trains on 2 CPU cores (vocab = 4096 BPE + 256 specials)."""
    return ModelConfig(vocab_size=4352, dim=256, n_layers=10, n_heads=4, n_kv_heads=2,
                       head_dim=64, ffn_dim=768, local_window=128, global_window=2048,
                       max_seq_len=2048, rope_original_context=2048, rope_theta=10_000.0)


def small() -> ModelConfig:
    """About 125M parameters, GPT-2-small-like width (vocab = 32,000 BPE + 256 specials)."""
    return ModelConfig(vocab_size=32_256, dim=768, n_layers=12, n_heads=12, n_kv_heads=4,
                       head_dim=64, ffn_dim=2048, local_window=1024, global_window=8192,
                       max_seq_len=8192)


def one_b() -> ModelConfig:
    """Llama-3.2-1B's trunk with CWM's vocabulary, untied embeddings and windows."""
    return ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                       ffn_dim=8192)


def eight_b() -> ModelConfig:
    """Llama-3-8B's trunk (the size of CWM's 8B ablations) with CWM's attention pattern."""
    return ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                       ffn_dim=14_336)


def cwm_32b() -> ModelConfig:
    """CWM's released shape, with the mid-training RoPE scaling (factor 16 over an 8k original)."""
    return ModelConfig(rope_factor=16.0)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "debug": debug, "tiny": tiny, "small": small, "1b": one_b, "8b": eight_b, "cwm-32b": cwm_32b,
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with ``overrides`` (snake_case or camelCase field names) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[name]().to_dict()
    base.update(normalize_fields(overrides))
    return ModelConfig(**base)


def count_parameters(config: ModelConfig) -> int:
    """Exact parameter count, computed by building the model on the meta device (no memory)."""
    with torch.device("meta"):
        model = CWM(config)
    return sum(p.numel() for p in model.parameters())
