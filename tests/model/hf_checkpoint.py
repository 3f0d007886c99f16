"""Random Hugging Face ``CwmForCausalLM`` checkpoints written by ``transformers`` itself, with a
small byte-level BPE ``tokenizer.json`` in CWM's layout (256 special slots above the base, CWM's
names), so the vocabulary matches ``vocab_size``: the inputs of ``cwm import-hf`` and of a
pipeline's ``spec.model.init`` in tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers  # the dev extra: pip install -e '.[dev]'

from cwm_model.tokenizer import train_tokenizer

BASE_VOCAB = 512  # 256 bytes + 256 merges; CWM's 256 specials go above: 768 tokens
TEXTS = [
    "def f(x):\n    return x + 1\n",
    "for i in range(10):\n    total += i * i\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
] * 20


def write_checkpoint(folder: Path, *, layers: int = 4, dim: int = 64, shard: str | None = None,
                     seed: int = 0, context: int = 1024, window: int = 64,
                     dtype: torch.dtype = torch.float32) -> Path:
    """A random CwmForCausalLM at ``folder`` (sharded when ``shard``, e.g. "40KB").

    Layer types follow CwmConfig's default (every 4th layer global), the RoPE is llama3-scaled
    beyond a short original context, so both of the import's mappings are exercised."""
    tokenizer = train_tokenizer(TEXTS, BASE_VOCAB)
    config = transformers.CwmConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=dim, intermediate_size=dim * 3,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=dim // 4, max_position_embeddings=context, sliding_window=window,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 128},
        bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id,
        eos_token_id=sorted({tokenizer.eos_id, *tokenizer.stop_ids}),
    )
    torch.manual_seed(seed)
    model = transformers.CwmForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm would show in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save(folder)
    return folder
