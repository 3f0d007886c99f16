"""CWM's GRPO variant as pure functions: advantages, the clipped loss, how often the clip acts,
and which trajectories are too stale to train on.

No I/O, no model: tensors and lists in, tensors and numbers out (the RL stage, ``cwm_jobs.rl``,
and the rollout thread, ``cwm_jobs.rollouts``, are the shells around them). As in CWM
(``MISSION.md``): advantage = reward - group mean (no std scaling), zero-advantage groups
skipped, the clipped surrogate with ``eps_low`` 0.2 below and ``eps_high`` 0.25 above
(clip-higher), token losses summed and divided by a fixed length (no length normalisation), no
KL term.

The "old" log-probabilities are those of the *sampling* policy, recorded token by token when
the rollout was generated. The ratio is 1 only on the first update of a batch sampled by the
current weights; every later update of the same batch (``rl.updatesPerBatch``) and every batch
sampled by an older snapshot (asynchronous rollouts) moves it, which is when the clip acts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: reward minus its group's mean, no std scaling."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def informative_groups(advantages: torch.Tensor) -> torch.Tensor:
    """(P,) bool: groups with any non-zero advantage (all-equal rewards teach nothing)."""
    return advantages.abs().amax(dim=1) > 0


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, max_length: int, num_samples: float, eps_low: float,
              eps_high: float) -> torch.Tensor:
    """Clipped surrogate loss over completion tokens.

    ``logp``/``old_logp``/``mask``: (N, T) per-token log-probabilities under the policy being
    trained and under the policy that sampled the tokens, and the loss mask (0 for prompt,
    padding and environment tokens); ``advantages``: (N,). The sum of token losses is divided
    by ``num_samples * max_length`` (fixed, so long answers are not favoured).
    """
    ratio = torch.exp(logp - old_logp)  # (N, T)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped) * mask
    return per_token.sum() / float(num_samples * max_length)


@dataclass
class ClipCounts:
    """Masked tokens of one or more loss evaluations: how many, how many the clip cut off below
    (negative advantage, ratio < 1 - eps_low) and above (positive advantage, ratio > 1 +
    eps_high) -- the tokens whose gradient the clip zeroed -- and the ratio's spread."""

    tokens: float = 0.0
    low: float = 0.0
    high: float = 0.0
    ratio_sum: float = 0.0
    ratio_dev_max: float = 0.0

    def add(self, other: ClipCounts) -> None:
        self.tokens += other.tokens
        self.low += other.low
        self.high += other.high
        self.ratio_sum += other.ratio_sum
        self.ratio_dev_max = max(self.ratio_dev_max, other.ratio_dev_max)

    def fractions(self) -> dict[str, float]:
        """``clip_fraction_low``/``high`` (shares of trained tokens), ``ratio_mean`` and
        ``ratio_dev_max`` (largest |ratio - 1|); zeros when no token was trained."""
        n = max(self.tokens, 1.0)
        return {"clip_fraction_low": self.low / n, "clip_fraction_high": self.high / n,
                "ratio_mean": self.ratio_sum / n if self.tokens else 1.0,
                "ratio_dev_max": self.ratio_dev_max}


def clip_counts(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, eps_low: float, eps_high: float) -> ClipCounts:
    """Where :func:`grpo_loss`'s clip engaged, for the same (N, T) inputs (no gradient)."""
    with torch.no_grad():
        ratio = torch.exp(logp - old_logp)  # (N, T)
        adv = advantages[:, None].expand_as(ratio)
        on = mask > 0
        low = on & (adv < 0) & (ratio < 1.0 - eps_low)
        high = on & (adv > 0) & (ratio > 1.0 + eps_high)
        dev = (ratio - 1.0).abs()[on]
        return ClipCounts(tokens=float(on.sum()), low=float(low.sum()), high=float(high.sum()),
                          ratio_sum=float(ratio[on].sum()),
                          ratio_dev_max=float(dev.max()) if dev.numel() else 0.0)


def minibatches(items: Sequence[T], count: int) -> list[list[T]]:
    """``items`` dealt round-robin into ``count`` lists (some empty when there are fewer items):
    one list per optimiser step, so every rank takes the same number of steps."""
    if count < 1:
        raise ValueError(f"minibatches: count must be >= 1, got {count}")
    return [list(items[i::count]) for i in range(count)]


def drop_stale(items: Sequence[T], version_of: Callable[[T], int], *, current: int,
               max_lag: int) -> tuple[list[T], Counter]:
    """Split trajectories by policy lag (``current`` - the version that sampled them).

    Returns those with lag <= ``max_lag`` and a Counter of every item's lag (the stale ones
    included, so the lag distribution shows what was dropped). A negative lag -- sampled by a
    policy newer than the trainer's -- cannot happen and raises.
    """
    kept: list[T] = []
    lags: Counter = Counter()
    for item in items:
        lag = current - version_of(item)
        if lag < 0:
            raise ValueError(f"a trajectory sampled by policy version {version_of(item)} is newer "
                             f"than the trainer's {current}")
        lags[lag] += 1
        if lag <= max_lag:
            kept.append(item)
    return kept, lags
