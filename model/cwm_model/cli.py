"""``cwm model info``, ``cwm export-hf``, ``cwm import-hf`` and ``cwm serve``.

The ``cwm`` command (``cwm_operator.cli``) calls :func:`register`; ``python -m cwm_model.cli ...``
runs the same subcommands standalone.

    python -m cwm_model.cli model info cwm-32b
    python -m cwm_model.cli export-hf runs/tiny/sft/checkpoint /tmp/cwm-hf
    python -m cwm_model.cli import-hf /models/cwm /tmp/cwm-checkpoint
    python -m cwm_model.cli serve runs/tiny/sft/checkpoint --port 8000
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cwm_spec.storage import StorageError


def cmd_model_info(args: argparse.Namespace) -> int:
    from cwm_model.presets import count_parameters, get_preset  # noqa: PLC0415 (imports torch: `cwm` starts in a second without it)

    overrides = dict(parse_override(item) for item in args.set or [])
    config = get_preset(args.preset, **overrides)
    count = count_parameters(config)
    print(f"preset {args.preset}: {count:,} parameters ({count / 1e9:.3f} B)")
    if args.json:
        print(json.dumps(config.to_dict(), indent=2))
    else:
        layers = "".join("G" if config.is_global(i) else "L" for i in range(config.n_layers))
        print(f"layers {config.n_layers} ({layers}), dim {config.dim}, ffn {config.ffn_dim}, "
              f"heads {config.n_heads}/{config.n_kv_heads} x {config.head_dim}, "
              f"vocab {config.vocab_size}, windows {config.local_window}/{config.global_window}, "
              f"rope theta {config.rope_theta:g} x{config.rope_factor:g}")
    return 0


def parse_override(item: str) -> tuple[str, object]:
    """``nLayers=4`` -> ("nLayers", 4): values are JSON when they parse, else strings."""
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_export_hf(args: argparse.Namespace) -> int:
    from cwm_model.hf_export import export_hf  # noqa: PLC0415 (imports torch: `cwm` starts in a second without it)

    out = export_hf(args.checkpoint, args.out)
    print(f"wrote Hugging Face CwmForCausalLM folder {out}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from cwm_model.hf_import import import_hf  # noqa: PLC0415 (imports torch: `cwm` starts in a second without it)

    try:
        config, tokenizer = import_hf(args.source, args.out)
    except (ValueError, StorageError) as err:  # bad input: one line naming the file or field
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote checkpoint {args.out}: {config.n_layers} layers, dim {config.dim}, "
          f"vocabulary {config.vocab_size} (tokenizer {tokenizer.vocab_size} tokens)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cwm_model.serve import serve  # noqa: PLC0415 (imports torch: `cwm` starts in a second without it)

    serve(args.checkpoint, host=args.host, port=args.port, model_name=args.model_name)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``model info``, ``export-hf``, ``import-hf`` and ``serve``; each sets ``func``
    returning an exit code."""
    model = subparsers.add_parser("model", help="model presets")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    info = model_sub.add_parser("info", help="print a preset's shape and parameter count")
    info.add_argument("preset", help="debug, tiny, small, 1b, 8b or cwm-32b")
    info.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="override a ModelConfig field (repeatable), e.g. --set nLayers=4")
    info.add_argument("--json", action="store_true", help="print the full config as JSON")
    info.set_defaults(func=cmd_model_info)

    export = subparsers.add_parser("export-hf", help="write a transformers CwmForCausalLM folder")
    export.add_argument("checkpoint", help="checkpoint folder (config.json + model.safetensors)")
    export.add_argument("out", help="output folder (must be new or empty)")
    export.set_defaults(func=cmd_export_hf)

    imp = subparsers.add_parser(
        "import-hf", help="convert a Hugging Face CwmForCausalLM folder (e.g. released CWM)")
    imp.add_argument("source", help="folder or URI with config.json, tokenizer.json and "
                     "model.safetensors or model.safetensors.index.json + shards")
    imp.add_argument("out", help="checkpoint folder or URI to write (must be new or empty)")
    imp.set_defaults(func=cmd_import_hf)

    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API for a checkpoint")
    serve.add_argument("checkpoint")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-name", default=None, help="model id to report (default: folder)")
    serve.set_defaults(func=cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cwm", description="CWM model commands")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
