"""Forward + backward throughput of our CWM decoder against transformers' CwmForCausalLM.

Both models get the same config (the ``tiny`` preset unless told otherwise) and the same weights
(through :func:`cwm_model.hf_export.hf_state_dict`), run in this one process on the CPU with the
same thread count, alternating (and swapping who goes first every step), so machine noise hits
both. Prints tokens per wall-clock second and per CPU-second of this process (steadier when other
processes share the cores), each as a median, and the ratios ours / Hugging Face (target >= 1.0).

    .venv/bin/python benchmarks/model_throughput.py                 # tiny, batch 8 x 256
    .venv/bin/python benchmarks/model_throughput.py --threads 1      # steadier on a shared box
    .venv/bin/python benchmarks/model_throughput.py --preset debug --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def build_pair(preset: str, seed: int) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    from transformers import CwmConfig, CwmForCausalLM

    from cwm_model.hf_export import default_special_ids, hf_config, hf_state_dict
    from cwm_model.model import CWM
    from cwm_model.presets import get_preset

    torch.manual_seed(seed)
    config = get_preset(preset)
    ours = CWM(config)
    bos, pad, eos = default_special_ids(config)
    fields = hf_config(config, bos_id=bos, eos_ids=eos, pad_id=pad)
    for key in ("architectures", "model_type", "dtype"):
        fields.pop(key)
    theirs = CwmForCausalLM(CwmConfig(**fields, attn_implementation="sdpa"))
    theirs.load_state_dict(hf_state_dict(config, ours.state_dict()), strict=True)
    return ours.train(), theirs.train(), config


def step_time(forward, params, tokens: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and process-CPU seconds for one forward + cross-entropy + backward pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    logits = forward(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for p in params:
        p.grad = None
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: PyTorch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, theirs, config = build_pair(args.preset, seed=0)
    runners = {
        "cwm_model.CWM": (lambda x: ours(x), list(ours.parameters())),
        "transformers.CwmForCausalLM": (lambda x: theirs(x).logits, list(theirs.parameters())),
    }
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for step in range(args.warmup + args.steps):
        order = list(runners) if step % 2 == 0 else list(reversed(runners))
        for name in order:
            forward, params = runners[name]
            elapsed = step_time(forward, params, tokens)
            if step >= args.warmup:
                times[name].append(elapsed)

    n_tokens = args.batch * args.seq
    print(f"preset={args.preset} batch={args.batch} seq={args.seq} steps={args.steps} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    wall, cpu = {}, {}
    for name, samples in times.items():
        wall[name] = n_tokens / statistics.median(w for w, _ in samples)
        cpu[name] = n_tokens / statistics.median(c for _, c in samples)
        print(f"{name:30s} {wall[name]:9.0f} tokens/s wall  {cpu[name]:9.0f} tokens/CPU-s "
              f"(medians of {len(samples)})")
    ours, theirs = "cwm_model.CWM", "transformers.CwmForCausalLM"
    print(f"ratio ours / transformers: wall {wall[ours] / wall[theirs]:.2f}x, "
          f"CPU {cpu[ours] / cpu[theirs]:.2f}x (target >= 1.0)")


if __name__ == "__main__":
    main()
