"""The supervised training loop shared by pretraining, mid-training and SFT (and the pieces RL
reuses): build the model and engine, resume, step, checkpoint, log, evaluate, save.

A stage module only says where its sequences come from (a ``make_batcher`` function); this
module does the rest identically for all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cwm_jobs.checkpointing import Resumed, StateStore, save_final_checkpoint
from cwm_jobs.common import (
    DistEnv,
    StepContext,
    device_type,
    distributed_session,
    load_context,
    seed_everything,
)
from cwm_jobs.data import Batcher, training_loss
from cwm_jobs.engine import build_engine
from cwm_jobs.evaluate import evaluate_model
from cwm_jobs.metrics import MetricsLogger
from cwm_jobs.sources import make_batcher_factory, stage_sources, validation_batches
from cwm_model.checkpoint import load_checkpoint
from cwm_model.model import CWM
from cwm_model.presets import get_preset
from cwm_model.tokenizer import CWMTokenizer
from cwm_spec import storage

LOG = logging.getLogger("cwm_jobs.trainer")


# --------------------------------------------------------------------------- model & tokenizer


def load_tokenizer(ctx: StepContext) -> Any:
    uri = ctx.input("tokenizer")
    if uri is None:
        raise ValueError(f"step configuration: inputs.tokenizer is required for {ctx.settings.name}")
    return CWMTokenizer.load(storage.local_copy(uri))  # `tokenizers` reads local files only


def build_model(ctx: StepContext, tokenizer: Any) -> torch.nn.Module:
    """The previous stage's checkpoint (``inputs.init``), or a fresh model from the preset.

    A fresh model's vocabulary is the tokenizer's, whatever the preset says, so the embedding
    always matches the data. Initialisation is seeded, so every rank builds the same weights.
    """
    init = ctx.input("init")
    if init:
        model, _, _ = load_checkpoint(storage.local_copy(init), device="cpu")
        vocab = model.config.vocab_size
        if vocab < tokenizer.vocab_size:
            raise ValueError(
                f"inputs.init {init}: model vocabulary {vocab} is smaller than the tokenizer's "
                f"{tokenizer.vocab_size}"
            )
        dtype = next(model.parameters()).dtype
        if dtype != torch.float32 and device_type() != "cuda":
            # A released checkpoint is bf16; the CPU engine trains fp32 weights with no master
            # copy (on GPUs DeepSpeed's bf16 mode keeps fp32 masters itself).
            LOG.info("inputs.init holds %s weights: training them as float32 on the CPU", dtype)
            model = model.float()
        return model
    seed_everything(ctx.seed)
    overrides = dict(ctx.model_spec.get("overrides") or {})
    overrides.pop("vocabSize", None)
    overrides["vocab_size"] = tokenizer.vocab_size
    config = get_preset(ctx.model_spec.get("preset", "tiny"), **overrides)
    return CWM(config)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"])
    return training_loss(logits, batch["targets"], batch["loss_mask"])


def all_mean(values: list[float]) -> float:
    """Mean of ``values`` over all ranks."""
    t = torch.tensor([sum(values), float(len(values))], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


def parameter_fingerprint(module: torch.nn.Module) -> list[float]:
    """Two float64 sums over all parameters (plain and position-weighted): equal on every rank
    when data parallelism kept the replicas identical."""
    total = weighted = 0.0
    for i, p in enumerate(module.parameters()):
        flat = p.detach().double().flatten()
        total += float(flat.sum())
        weighted += float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64,
                                               device=flat.device)).sum()) * (i + 1)
    return [total, weighted]


def ranks_agree(module: torch.nn.Module) -> bool:
    """Whether all ranks hold bit-identical parameter fingerprints."""
    mine = parameter_fingerprint(module)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return True
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return all(g == mine for g in gathered)


@contextmanager
def full_parameters(engine: Any) -> Iterator[torch.nn.Module]:
    """The whole module on every rank (ZeRO-3 partitions parameters; gather them)."""
    module = engine.module
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed  # noqa: PLC0415 (importing DeepSpeed picks the accelerator: only once training starts)

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module
    else:
        yield module


# --------------------------------------------------------------------------- the loop


@dataclass
class Stage:
    """Everything a running stage holds."""

    ctx: StepContext
    env: DistEnv
    tokenizer: Any
    engine: Any
    store: StateStore
    metrics: MetricsLogger
    step: int
    resumed: Resumed | None

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def save_state(self, data_state: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        self.store.save(self.engine, self.step, data_state, {"step": self.step, **(extra or {})})
        self.metrics.sync()

    def finish(self, evaluation: dict[str, float]) -> None:
        """Check that every rank holds the same parameters, then save the consolidated
        checkpoint and ``eval.json`` (rank 0)."""
        with full_parameters(self.engine) as module:
            evaluation["ranks_identical"] = float(ranks_agree(module))
            if not evaluation["ranks_identical"]:
                raise RuntimeError("parameters differ across ranks at the end of the stage")
            if self.env.is_main:
                save_final_checkpoint(
                    self.ctx.output("checkpoint"), module, self.tokenizer,
                    {"stage": self.ctx.settings.name, "steps": self.step,
                     "pipeline": self.ctx.config.get("pipeline"), "eval": evaluation},
                )
        self.metrics.write_eval(evaluation)
        dist.barrier()


def open_stage(ctx: StepContext, env: DistEnv, *, micro_batch_size: int | None = None) -> Stage:
    """Tokenizer, model, engine, and the resumed state if a previous attempt saved one."""
    device = device_type()
    tokenizer = load_tokenizer(ctx)
    model = build_model(ctx, tokenizer)
    engine = build_engine(model, ctx.settings, world_size=env.world_size, device_type=device,
                          micro_batch_size=micro_batch_size)
    store = StateStore(ctx.output("state"), env, ctx.config.get("fingerprint"))
    resumed = store.load(engine)
    metrics = MetricsLogger(ctx.output("metrics"), stage=ctx.settings.name,
                            total_steps=ctx.settings.steps, enabled=env.is_main,
                            resume_step=resumed.step if resumed else None)
    step = resumed.step if resumed else 0
    if env.is_main:
        params = sum(p.numel() for p in model.parameters())
        LOG.info("%s: %s parameters, %d processes on %s, ZeRO-%d, %s", ctx.settings.name,
                 f"{params:,}", env.world_size, device, ctx.settings.zero_stage,
                 f"resuming at step {step}" if resumed else "starting at step 0")
    return Stage(ctx, env, tokenizer, engine, store, metrics, step, resumed)


def train_supervised(
    stage: Stage,
    make_batcher: Callable[[dict[str, Any] | None], Batcher],
    evaluate: Callable[[Stage], dict[str, float]],
) -> dict[str, float]:
    """Run the stage's remaining steps, then evaluate and save. Returns the evaluation."""
    s = stage.ctx.settings
    batcher = make_batcher(stage.resumed.data_state if stage.resumed else None)
    engine = stage.engine
    tokens_per_step = s.micro_batch_size * s.sequence_length * s.gradient_accumulation * stage.env.world_size
    while stage.step < s.steps:
        start = time.perf_counter()
        lr = float(engine.get_lr()[0])  # the rate this step uses (the scheduler moves on after it)
        losses = []
        for _ in range(s.gradient_accumulation):
            batch = to_device(batcher.next(), stage.device)
            loss = forward_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        stage.step += 1
        elapsed = time.perf_counter() - start
        grad_norm = engine.get_global_grad_norm()
        values = {"loss": all_mean(losses), "lr": lr,
                  "tokens_per_second": tokens_per_step / max(elapsed, 1e-9),
                  "step_seconds": elapsed}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        stage.metrics.log(stage.step, values)
        if s.eval_every and stage.step % s.eval_every == 0 and stage.step < s.steps:
            stage.metrics.log(stage.step, {f"eval/{k}": v for k, v in evaluate(stage).items()})
        if stage.step % s.checkpoint_every == 0 or stage.step == s.steps:
            stage.save_state(batcher.state())
    if stage.env.is_main:
        corrupt = {k: v for k, v in batcher.stats.items() if k.startswith("corrupt")}
        if corrupt:
            LOG.warning("skipped unusable records: %s", corrupt)
    results = evaluate(stage)
    results.update({f"data/{k}": float(v) for k, v in sorted(batcher.stats.items())})
    stage.finish(results)
    return results


# --------------------------------------------------------------------------- stage entry point


def stage_evaluator(ctx: StepContext, env: DistEnv, validation: list[dict[str, Any]]
                    ) -> Callable[[Stage], dict[str, float]]:
    def evaluate(stage: Stage) -> dict[str, float]:
        with full_parameters(stage.engine) as module:
            return evaluate_model(
                module, stage.tokenizer, rank=env.rank, world=env.world_size,
                validation=validation, traces_uri=ctx.input("traces"),
                trajectories_uri=ctx.input("trajectories") if ctx.settings.name == "sft" else None,
                evaluation=ctx.evaluation_spec, sandbox=ctx.config.get("sandbox"),
                max_tokens=max(ctx.settings.sequence_length, 16) * 4,
                chat=ctx.settings.name == "sft", training=training_inputs(ctx),
            )

    return evaluate


def training_inputs(ctx: StepContext) -> dict[str, str]:
    """The data sets of programs this pipeline trains on, which the evaluation checks its own
    programs against (cwm_spec.programs)."""
    given = {name: ctx.input(name) for name in ("traces", "trajectories")}
    return {name: uri for name, uri in given.items() if uri}


def run_lm_stage(name: str, argv: list[str] | None = None) -> dict[str, float]:
    """Parse, build, train, clean up: the whole of pretrain, midtrain and SFT."""
    ctx = load_context(name, argv)
    s = ctx.settings
    with distributed_session() as env:
        stage = open_stage(ctx, env)
        try:
            sources = stage_sources(ctx, stage.tokenizer)
            make = make_batcher_factory(sources, env, seed=ctx.seed, length=s.sequence_length,
                                        micro_batch_size=s.micro_batch_size)
            # Validation budget: sequences per source over all ranks.
            budget = ctx.evaluation_spec.validation_sequences
            validation = validation_batches(
                sources, env, seed=ctx.seed, length=s.sequence_length,
                micro_batch_size=s.micro_batch_size * 4,
                max_sequences=max(1, budget // env.world_size))
            return train_supervised(stage, make, stage_evaluator(ctx, env, validation))
        finally:
            stage.metrics.close()
