"""Peak memory of ``cwm import-hf`` against the checkpoint's size on disk.

Writes a random Hugging Face ``CwmForCausalLM`` with CWM-32B's exact widths (dim 6144, ffn
21504, 48/8 heads, vocabulary 128,256, bf16: the released checkpoint's tensors, the largest being
the 1.5 GiB embedding and output matrices) but only ``--layers`` layers, sharded by
``save_pretrained(max_shard_size=...)``; then runs ``cwm import-hf`` on it in a fresh child
process, which reports its own peak RSS (``VmHWM``). A second child that only imports the same
modules (Python, torch, cwm_model) gives the baseline.

    .venv/bin/python benchmarks/hf_import_memory.py --layers 2 --shard 1GB --dir /tmp/hf-bench

Needs about twice the checkpoint's size free on ``--dir`` (source and import); both are deleted
at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers  # the dev extra: pip install -e '.[dev]'
from tokenizers import pre_tokenizers

from cwm_model.tokenizer import special_token_names

CWM_32B = {"vocab_size": 128_256, "hidden_size": 6144, "intermediate_size": 21_504,
           "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
           "max_position_embeddings": 131_072, "sliding_window": 8192}
HWM = ("import sys\nfrom cwm_operator.cli import main\nrc = main(sys.argv[1:]) if sys.argv[1:] "
       "else 0\nprint(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
       "sys.exit(rc)")


def write_source(folder: Path, layers: int, shard: str) -> int:
    """The random checkpoint; returns its size on disk (bytes)."""
    config = transformers.CwmConfig(num_hidden_layers=layers, **CWM_32B)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: half the memory of float32
    try:
        with torch.no_grad():
            model = transformers.CwmForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size=shard)
    del model
    (folder / "tokenizer.json").write_text(json.dumps(released_layout_tokenizer()))
    return sum(p.stat().st_size for p in folder.iterdir())


def released_layout_tokenizer() -> dict:
    """A 128,256-token byte-level BPE tokenizer.json with CWM's special slots (filler tokens)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), 128_000)})
    added = [{"id": 128_000 + i, "content": name, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for i, name in enumerate(special_token_names())]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", **byte_level},
            "post_processor": None, "decoder": {"type": "ByteLevel", **byte_level},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}


def child_peak_mib(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of ``cwm ARGS`` in a fresh process (no args: the modules
    only). VmHWM is the process's own high-water mark, begun at exec: unlike
    ``getrusage(RUSAGE_CHILDREN)``, it carries nothing of this (large) parent's memory over."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", HWM, "import-hf", *args] if args else
                          [sys.executable, "-c", HWM.replace("from cwm_operator.cli import main",
                                                             "import cwm_operator.cli, "
                                                             "cwm_model.cli, cwm_model.hf_import")],
                          check=True, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    line = next(x for x in done.stdout.splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shard", default="1GB", help="save_pretrained's max_shard_size")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hf-import-bench"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    source, out = args.dir / "source", args.dir / "imported"
    start = time.perf_counter()
    size = write_source(source, args.layers, args.shard)
    built = time.perf_counter() - start
    shards = len(list(source.glob("*.safetensors")))
    try:
        peak, seconds = child_peak_mib([str(source), str(out)])
        written = (out / "model.safetensors").stat().st_size
        baseline, _ = child_peak_mib([])
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(f"source: {args.layers} layers at CWM-32B width, bf16, {size / 2**30:.2f} GiB in "
          f"{shards} shards (built in {built:.0f} s)")
    print(f"import-hf: {seconds:.1f} s ({written / 2**20 / seconds:.0f} MiB/s written), "
          f"peak RSS {peak:.0f} MiB; the modules alone {baseline:.0f} MiB; "
          f"peak / size on disk {peak * 2**20 / size:.3f}")


if __name__ == "__main__":
    main()
