"""cwm_model: the CWM decoder, its tokenizer and chat format, checkpoints, generation, serving.

    config.py      ModelConfig: the model's shape, validated; camelCase overrides accepted
    presets.py     debug, tiny, small, 1b, 8b, cwm-32b; count_parameters (meta device)
    model.py       CWM: RMSNorm, Llama-3 RoPE, GQA with local/global windows and document
                   masks (SDPA or FlexAttention, picked in make_attention), SwiGLU, KV cache
    generate.py    batched KV-cache generation: greedy, temperature/top-p, stop ids, log-probs
    tokenizer.py   byte-level BPE with CWM's special tokens at CWM's ids / offsets
    chat.py        OpenAI messages <-> CWM chat format (segments for loss masks, tool calls)
    checkpoint.py  safetensors + config.json (+ tokenizer.json), atomic save, load
    hf_export.py   `cwm export-hf`: a folder transformers' CwmForCausalLM loads
    serve.py       `cwm serve`: OpenAI-compatible chat/completions HTTP API (stdlib)
    cli.py         register(subparsers) for the `cwm` CLI; `python -m cwm_model.cli`
"""
