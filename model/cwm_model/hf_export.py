"""Export a checkpoint as a Hugging Face folder that ``transformers``' ``CwmForCausalLM`` loads.

The target is ``transformers.models.cwm`` (``CwmConfig``, ``modeling_cwm.py``, checked against
transformers 5.24): Llama-style weight names, ``rope_parameters`` with ``rope_type: llama3``, and
``layer_types`` listing ``full_attention`` / ``sliding_attention`` per layer with one
``sliding_window``. Hugging Face's global layers attend to everything, so an export is exact only
while ``global_window >= max_seq_len``; :func:`hf_config` refuses otherwise rather than writing a
model that silently differs on long inputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cwm_model.chat import NATIVE_TOOL_SPECS
from cwm_model.checkpoint import load_checkpoint
from cwm_model.config import ModelConfig


def hf_config(config: ModelConfig, *, bos_id: int, eos_ids: list[int], pad_id: int | None,
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``config.json`` for ``CwmConfig`` describing exactly our model."""
    if config.global_window < config.max_seq_len:
        raise ValueError(f"ModelConfig.global_window ({config.global_window}) is below "
                         f"max_seq_len ({config.max_seq_len}): Hugging Face's CWM global layers "
                         "see the whole sequence, so the export would not match")
    return {
        "architectures": ["CwmForCausalLM"],
        "model_type": "cwm",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": config.rope_theta,
            "factor": config.rope_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_context,
        },
        "sliding_window": config.local_window,
        "layer_types": ["full_attention" if config.is_global(i) else "sliding_attention"
                        for i in range(config.n_layers)],
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def default_special_ids(config: ModelConfig) -> tuple[int, int, list[int]]:
    """bos, pad and eos ids where no tokenizer says: our layout puts CWM's 256 special slots at
    the top of the vocabulary (``<|begin_of_text|>`` +0, ``<|end_of_text|>`` +1, ``<|pad|>`` +4)."""
    base = max(config.vocab_size - 256, 0)
    return base, min(base + 4, config.vocab_size - 1), [min(base + 1, config.vocab_size - 1)]


HF_NAMES = {  # ours (CWM's names) -> Hugging Face's, per layer
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_GLOBAL_NAMES = {  # ours -> Hugging Face's, outside the layers
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_name(ours: str) -> str:
    """Hugging Face's name of one of our weights (``layers.3.attention.wq.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); the one table read forwards (export)."""
    if ours in HF_GLOBAL_NAMES:
        return HF_GLOBAL_NAMES[ours]
    match = _OUR_LAYER.match(ours)
    if match and match.group(2) in HF_NAMES:
        return f"model.layers.{match.group(1)}.{HF_NAMES[match.group(2)]}"
    raise KeyError(f"weight {ours!r} has no Hugging Face CWM name")


def cwm_name(theirs: str) -> str:
    """Our name of a Hugging Face CWM weight: the same table read backwards (import)."""
    for ours, name in HF_GLOBAL_NAMES.items():
        if name == theirs:
            return ours
    match = _HF_LAYER.match(theirs)
    if match:
        for ours, name in HF_NAMES.items():
            if name == match.group(2):
                return f"layers.{match.group(1)}.{ours}"
    raise KeyError(f"weight {theirs!r} is not one of Hugging Face CwmForCausalLM's")


def hf_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face's names (both use the rotate-half RoPE layout, so q and k
    need no permutation)."""
    return {hf_name(name): tensor.detach().contiguous().clone() for name, tensor in state.items()}


def _native_specs_jinja() -> str:
    """CWM's native tool specs as a Jinja dict literal (strings JSON-quoted)."""
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}"
                           for k, v in NATIVE_TOOL_SPECS.items()) + "}"


CHAT_TEMPLATE = (
    # cwm_model.chat.render_messages (CWM's template) as Jinja, for transformers'
    # apply_chat_template and vLLM; tests/model/test_hf_export.py checks the two render the same
    # text. ``enable_thinking`` (default true, as CWM's own template) ends the generation prompt
    # with "<think>\n". Tool-call arguments: a dict (what transformers and vLLM hand templates)
    # becomes CWM's plain-text body for bash/edit/create/submit; a string is used verbatim.
    "{%- set native = " + _native_specs_jinja() + " -%}"
    "{%- set ns = namespace(tools='', last=-1) -%}"
    "{%- for tool in (tools or []) -%}"
    "{%- set fn = tool.function if tool.function is defined else tool -%}"
    "{%- if fn.name in native -%}{%- set spec = native[fn.name] -%}"
    "{%- else -%}"
    "{%- set params = fn.parameters if fn.parameters is defined and fn.parameters else {'type': 'object', 'properties': {}} -%}"
    "{%- set spec = '<tool: ' ~ fn.name ~ '>\n[json params]\n</tool>' ~ (('\n' ~ fn.description ~ '\n') if fn.description else '') ~ '\nParameters must respect the following schema: ' ~ (params | tojson(indent=2)) ~ (('\nRequired parameters: ' ~ (params.required | join(', ')) ~ '\n') if params.required else '') -%}"
    "{%- endif -%}"
    "{%- set ns.tools = ns.tools ~ ('' if loop.first else '\n\n') ~ spec -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}{%- if message.role == 'system' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- set tools_message = '<|start_header_id|>system<|end_header_id|>\n\n' ~ ('You have access to the following tools:\n' ~ ns.tools).strip() ~ '<|eot_id|>' -%}"
    "<|begin_of_text|>"
    "{%- if tools and ns.last < 0 -%}{{- tools_message -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- set body = namespace(text=(message.content or '').strip()) -%}"
    "{%- for call in (message.tool_calls or []) -%}"
    "{%- set a = call.function.arguments -%}{%- set name = call.function.name -%}"
    "{%- if a is string -%}{%- set text = a -%}"
    "{%- elif name == 'bash' -%}{%- set text = a.command -%}"
    "{%- elif name == 'edit' -%}{%- set text = a.path ~ '\n<<<<<<< SEARCH\n' ~ a.search ~ '\n=======\n' ~ a.replace ~ '\n>>>>>>> REPLACE' -%}"
    "{%- elif name == 'create' -%}{%- set text = a.path ~ '\n' ~ a.content -%}"
    "{%- elif name == 'submit' -%}{%- set text = a.path -%}"
    "{%- else -%}{%- set text = a | tojson -%}{%- endif -%}"
    "{%- set body.text = body.text ~ ('\n' if body.text else '') ~ '<tool: ' ~ name ~ '>\n' ~ text ~ '\n</tool>' -%}"
    "{%- endfor -%}"
    "{%- set thought = message.reasoning_content if message.reasoning_content is defined and message.reasoning_content is not none else (message.reasoning if message.reasoning is defined else none) -%}"
    "{%- if thought is not none -%}"
    "{%- set body.text = '<think>\n' ~ thought.strip() ~ '\n</think>\n' ~ body.text -%}"
    "{%- endif -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' ~ body.text ~ '<|eot_id|>' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- set found = namespace(name=message.name or '') -%}"
    "{%- for other in messages -%}{%- for call in (other.tool_calls or []) -%}"
    "{%- if not found.name and call.id == message.tool_call_id -%}{%- set found.name = call.function.name -%}{%- endif -%}"
    "{%- endfor -%}{%- endfor -%}"
    "{{- '<|start_header_id|>tool: ' ~ found.name ~ '<|end_header_id|>\n\n' ~ (message.content or '') ~ '<|eot_id|>' -}}"
    "{%- else -%}"
    "{{- '<|start_header_id|>' ~ message.role ~ '<|end_header_id|>\n\n' ~ (message.content or '').strip() ~ '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- if tools and loop.index0 == ns.last -%}{{- tools_message -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
    "{%- if enable_thinking is not defined or enable_thinking -%}{{- '<think>\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """``tokenizer_config.json`` so ``AutoTokenizer`` wraps our ``tokenizer.json``."""
    names = {i: tokenizer.id_to_token(i) for i in (tokenizer.bos_id, tokenizer.eos_id,
                                                     tokenizer.pad_id)}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[tokenizer.bos_id],
        "eos_token": names[tokenizer.eos_id],
        "pad_token": names[tokenizer.pad_id],
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out`` (config.json, model.safetensors, generation_config.json, tokenizer files)."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    config = model.config
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"export-hf output folder {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        bos, pad = tokenizer.bos_id, tokenizer.pad_id
        eos = sorted({tokenizer.eos_id, *tokenizer.stop_ids})
    else:
        bos, pad, eos = default_special_ids(config)
    cfg = hf_config(config, bos_id=bos, eos_ids=eos, pad_id=pad,
                    dtype=next(model.parameters()).dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_file(hf_state_dict(config, model.state_dict()), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(out)
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer),
                                                              indent=2))
    return out
