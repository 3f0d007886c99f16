"""The DeepSpeed engine: configuration, schedule, and equality with a plain PyTorch loop."""

from __future__ import annotations

import copy

import pytest
import torch

from cwm_jobs.engine import LRSchedule, build_engine, deepspeed_config, parameter_groups
from cwm_spec.api import StageSpec


def settings(**kw) -> StageSpec:
    base = {"name": "pretrain", "steps": 6, "micro_batch_size": 2, "gradient_accumulation": 2,
                "learning_rate": 1e-2, "min_learning_rate": 1e-3, "warmup_steps": 2, "zero_stage": 2}
    base.update(kw)
    return StageSpec(**base)


def test_config_follows_the_stage_and_device():
    cpu = deepspeed_config(settings(), world_size=2, device_type="cpu")
    assert cpu["train_batch_size"] == 2 * 2 * 2
    assert cpu["gradient_clipping"] == 1.0
    assert cpu["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert cpu["optimizer"]["params"]["weight_decay"] == 0.1
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    assert cpu["zero_optimization"]["stage"] == 2 and not cpu["bf16"]["enabled"]
    gpu = deepspeed_config(settings(zero_stage=3), world_size=8, device_type="cuda")
    assert gpu["bf16"]["enabled"] and gpu["data_types"]["grad_accum_dtype"] == "fp32"
    assert gpu["zero_optimization"]["stage"] == 3
    small = deepspeed_config(settings(), world_size=1, device_type="cpu", parameters=300_000)
    assert small["zero_optimization"]["reduce_bucket_size"] == 10_000_000
    big = deepspeed_config(settings(), world_size=1, device_type="cpu", parameters=8 * 10**9)
    assert big["zero_optimization"]["allgather_bucket_size"] == 500_000_000


def test_one_gpu_without_accumulation_skips_what_only_pays_off_across_ranks():
    many = deepspeed_config(settings(gradient_accumulation=1), world_size=8, device_type="cuda")
    assert many["zero_optimization"]["overlap_comm"] and many["zero_optimization"]["contiguous_gradients"]
    assert many["data_types"]["grad_accum_dtype"] == "fp32"      # averaged over ranks
    one = deepspeed_config(settings(gradient_accumulation=1), world_size=1, device_type="cuda")
    assert not one["zero_optimization"]["overlap_comm"]
    assert not one["zero_optimization"]["contiguous_gradients"]
    assert one["data_types"]["grad_accum_dtype"] == "bf16"       # nothing is summed
    accumulating = deepspeed_config(settings(), world_size=1, device_type="cuda")
    assert accumulating["data_types"]["grad_accum_dtype"] == "fp32"


def test_schedule_warms_up_then_decays_to_the_floor_or_stays_constant():
    cos = LRSchedule(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert cos(0) < cos(5) < cos(9) < 1.0 and cos(10) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    assert all(cos(s) >= cos(s + 1) for s in range(10, 150))
    const = LRSchedule(total_steps=100, warmup_steps=10, min_ratio=0.1, schedule="constant")
    assert const(10) == const(99) == 1.0


def test_weight_decay_skips_one_dimensional_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.out = torch.nn.Linear(16, 50)

    def forward(self, ids):
        return self.out(self.norm(self.emb(ids)))


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))


def test_deepspeed_zero2_matches_a_plain_pytorch_loop(dist_group):
    s = settings()
    plain = TinyLM()
    engine = build_engine(copy.deepcopy(plain), s, world_size=1, device_type="cpu")
    optimizer = torch.optim.AdamW(parameter_groups(plain, s.weight_decay), lr=s.learning_rate,
                                  betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule.from_settings(s))
    data = torch.randint(0, 50, (s.steps, s.gradient_accumulation, 2, 9),
                         generator=torch.Generator().manual_seed(1))
    for step in range(s.steps):
        ds_losses, plain_losses = [], []
        for micro in data[step]:
            loss = lm_loss(engine, micro)
            engine.backward(loss)
            engine.step()
            ds_losses.append(loss.item())
            ploss = lm_loss(plain, micro)
            (ploss / s.gradient_accumulation).backward()
            plain_losses.append(ploss.item())
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        assert ds_losses == pytest.approx(plain_losses, rel=1e-5)
    assert engine.global_steps == s.steps
    assert engine.get_lr()[0] == pytest.approx(scheduler.get_last_lr()[0])
    for a, b in zip(engine.module.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
