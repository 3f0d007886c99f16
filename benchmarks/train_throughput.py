"""DeepSpeed training-step throughput against a plain PyTorch loop, same model, same data, same run.

Both loops train their own copy of the same freshly initialised model on the same packed batches
(document ids included, so document masking runs): the DeepSpeed engine built by
``cwm_jobs.engine.build_engine`` (ZeRO-2 by default, AdamW β 0.9/0.95, clipping 1.0, the stage's
schedule), and a loop of ``torch.optim.AdamW`` + ``clip_grad_norm_`` + the same schedule. Steps
are timed one by one, alternating the two loops, and compared by their medians, so a busy machine
slows both alike. Prints steps/s, tokens/s and the ratio DeepSpeed / plain (target >= 0.9).

On a GPU the engine runs bf16 (fp32 master weights), the baseline bf16 autocast over fp32
weights, and the script also prints MFU for the named card::

    python benchmarks/train_throughput.py                               # CPU, tiny preset
    python benchmarks/train_throughput.py --preset 1b --device cuda     # MFU on the GPU

MFU = achieved model FLOP/s / the card's dense bf16 peak, with model FLOPs per token
6 * parameters (input embeddings excluded) + 12 * layers * (heads * head_dim) * context, context
being min(sequence length, the layer's window) (PaLM's accounting, no causal discount).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

# Peak dense bf16 FLOP/s by card name (vendor datasheets, no sparsity).
PEAK_BF16 = {
    "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12,
    "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12,
}


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, value in PEAK_BF16.items():  # most specific names first
        if key in name:
            return value
    return None


def model_flops_per_token(config: Any, seq_len: int, params: int) -> float:
    embed = config.vocab_size * config.dim  # the input lookup is not a matmul
    attn = sum(12 * config.n_heads * config.head_dim * min(seq_len, config.window(i))
               for i in range(config.n_layers))
    return 6 * (params - embed) + attn


def make_batches(count: int, batch: int, seq_len: int, vocab: int, docs: int, device: str):
    """Random tokens cut into ``docs`` documents per sequence, as the packer emits them."""
    from cwm_jobs.data import Packed, collate

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        sequences = []
        for _ in range(batch):
            tokens = torch.randint(0, vocab, (seq_len + 1,), generator=g).tolist()
            cuts = sorted(torch.randperm(seq_len, generator=g)[: docs - 1].add(1).tolist())
            doc_ids, positions, piece, start = [], [], 0, 0
            for i in range(seq_len + 1):
                if piece < len(cuts) and i == cuts[piece]:
                    piece, start = piece + 1, i
                doc_ids.append(piece)
                positions.append(i - start)
            sequences.append(Packed(tokens, [1] * (seq_len + 1), doc_ids, positions))
        out.append({k: v.to(device) for k, v in collate(sequences).items()})
    return out


def override_deepspeed_config(override: dict[str, Any]) -> None:
    """Make build_engine use the stage's config with ``override`` merged in (dicts deeply)."""
    import cwm_jobs.engine as engine_module

    original = engine_module.deepspeed_config

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        for key, value in extra.items():
            base[key] = (merge(dict(base.get(key) or {}), value) if isinstance(value, dict)
                         else value)
        return base

    engine_module.deepspeed_config = lambda *a, **k: merge(original(*a, **k), override)


def profile_steps(folder: str, steps: dict[str, Any], batch: dict[str, torch.Tensor],
                  cuda: bool) -> None:
    """One profiled step per loop; the operators that took the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, step in steps.items():
        if step is None:
            continue
        with profile(activities=activities) as prof:
            step(batch)
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40,
            max_name_column_width=70)
        with open(os.path.join(folder, f"profile-{name}.txt"), "w") as f:
            f.write(table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile-scope", default="blocks", choices=["blocks", "pointwise"],
                        help="what CWM.compile_for_training fuses on the GPU")
    parser.add_argument("--eager-loss", action="store_true",
                        help="the loss uncompiled (masked_lm_loss instead of training_loss)")
    parser.add_argument("--no-baseline", action="store_true", help="DeepSpeed only (memory)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's peak")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--ds-override", default=None, metavar="JSON",
                        help="merged into the stage's DeepSpeed config (to try settings), e.g. "
                             "'{\"zero_optimization\": {\"overlap_comm\": false}}'")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing, profile one step of each loop (torch.profiler) and "
                             "write the top operators by device time to DIR")
    args = parser.parse_args(argv)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    os.environ["CWM_DEVICE"] = args.device
    micro = args.micro_batch or (4 if cuda else 8)  # CPU: the stage defaults, 8 x 256
    seq_len = args.seq_len or (2048 if cuda else 256)
    steps = args.steps or (20 if cuda else 8)

    import cwm_jobs.common as common
    from cwm_jobs.data import masked_lm_loss, training_loss
    from cwm_jobs.engine import BETAS, GRADIENT_CLIPPING, LRSchedule, build_engine, parameter_groups
    from cwm_model.model import CWM
    from cwm_model.presets import get_preset
    from cwm_spec.api import StageSpec

    common.init_distributed(common.DistEnv(master_port=common.free_port()), args.device)
    config = get_preset(args.preset)
    settings = StageSpec(
        name="pretrain", steps=10_000, micro_batch_size=micro, sequence_length=seq_len,
        learning_rate=3e-4, min_learning_rate=3e-5, warmup_steps=10, zero_stage=args.zero,
        activation_checkpointing=args.activation_checkpointing)
    torch.manual_seed(0)
    model = CWM(config)
    params = sum(p.numel() for p in model.parameters())
    device = torch.device("cuda" if cuda else "cpu")
    batches = make_batches(steps + args.warmup, micro, seq_len, config.vocab_size,
                           docs=4, device=str(device))
    plain = None if args.no_baseline else copy.deepcopy(model).to(device)
    if plain is not None and cuda:
        plain.compile_for_training(args.compile_scope)  # as build_engine does for the engine's
    if args.ds_override:
        override_deepspeed_config(json.loads(args.ds_override))
    engine = build_engine(model, settings, world_size=1, device_type=args.device,
                          compile_scope=args.compile_scope)
    loss_fn = masked_lm_loss if args.eager_loss else training_loss

    if plain is not None:
        if args.activation_checkpointing:
            plain.set_activation_checkpointing(True)
        optimizer = torch.optim.AdamW(parameter_groups(plain, settings.weight_decay),
                                      lr=settings.learning_rate, betas=BETAS, eps=1e-8,
                                      fused=cuda or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule.from_settings(settings))

    def forward(module: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = module(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"])
        return loss_fn(logits, batch["targets"], batch["loss_mask"])

    def ds_step(batch: dict[str, torch.Tensor]) -> None:
        engine.backward(forward(engine, batch))
        engine.step()

    def plain_step(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = forward(plain, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), GRADIENT_CLIPPING)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(step_fn: Any, chunk: list[dict[str, torch.Tensor]]) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in chunk:
            step_fn(batch)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for batch in batches[: args.warmup]:
        ds_step(batch)
        if plain is not None:
            plain_step(batch)
    # Alternate single steps and compare medians: load spikes from other processes on a shared
    # machine hit a few steps of either loop, not the middle of both distributions.
    ds_times, plain_times = [], []
    for batch in batches[args.warmup:]:
        ds_times.append(timed(ds_step, [batch]))
        if plain is not None:
            plain_times.append(timed(plain_step, [batch]))
    ds_time = statistics.median(ds_times) * len(ds_times)
    plain_time = statistics.median(plain_times) * len(plain_times) if plain_times else 0.0

    if args.profile:
        profile_steps(args.profile, {"deepspeed": ds_step, "plain": plain_step if plain else None},
                      batches[-1], cuda)

    timed_steps = len(ds_times)
    tokens = timed_steps * micro * seq_len
    device_name = (torch.cuda.get_device_name() if cuda else
                   f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    results: dict[str, Any] = {
        "device": device_name, "preset": args.preset, "parameters": params, "zero_stage": args.zero,
        "dtype": "bf16" if cuda else "fp32", "micro_batch": micro, "seq_len": seq_len,
        "timed_steps": timed_steps, "deepspeed_steps_per_s": timed_steps / ds_time,
        "deepspeed_tokens_per_s": tokens / ds_time,
    }
    if plain is not None:
        results.update(plain_steps_per_s=timed_steps / plain_time,
                       plain_tokens_per_s=tokens / plain_time, ratio=plain_time / ds_time)
    if cuda:
        flops = model_flops_per_token(config, seq_len, params) * tokens / ds_time
        peak = peak_flops(device_name, args.peak_tflops)
        results["deepspeed_model_tflops"] = flops / 1e12
        results["peak_bf16_tflops"] = peak / 1e12 if peak else None
        results["mfu"] = flops / peak if peak else None
        results["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"device: {device_name}")
    print(f"model: {args.preset} ({params:,} parameters), micro batch {micro} x {seq_len} tokens, "
          f"ZeRO-{args.zero}, {results['dtype']}, {timed_steps} timed steps")
    print(f"deepspeed: {results['deepspeed_steps_per_s']:.3f} steps/s, "
          f"{results['deepspeed_tokens_per_s']:,.0f} tokens/s")
    if plain is not None:
        print(f"plain pytorch: {results['plain_steps_per_s']:.3f} steps/s, "
              f"{results['plain_tokens_per_s']:,.0f} tokens/s")
        print(f"ratio deepspeed / plain: {results['ratio']:.3f} (target >= 0.9)")
    if cuda:
        mfu = results["mfu"]
        print(f"MFU: {mfu:.1%} of {results['peak_bf16_tflops']:.0f} TFLOP/s" if mfu is not None
              else "MFU: unknown card, pass --peak-tflops")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    common.teardown_distributed()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
