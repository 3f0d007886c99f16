"""Confidence intervals for the accuracies `cwm compare` reports, and for the difference between
two runs scored on the same problems. Pure functions, no I/O.

* :func:`wilson`: the Wilson score interval of one accuracy (k right of n). It stays inside
  [0, 1] and keeps its coverage at 0 or n right and at small n, where the normal (Wald)
  interval collapses to a point.
* :func:`paired`: two runs' verdicts on the same problems. The difference of accuracies, a
  percentile bootstrap interval over problems (resampling the problems, each with both runs'
  verdicts, so the correlation between the runs is kept), and McNemar's exact test: under "no
  difference" each problem that only one run gets right is equally likely to be either run's,
  so the count of run A's wins among the discordant problems is Binomial(discordant, 1/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Interval:
    """An estimate with its lower and upper bound."""

    value: float
    low: float
    high: float

    def format(self, points: bool = False) -> str:
        """``0.412 [0.365, 0.461]``, or in percentage points with a sign (``+12.0 [+7.1, +16.9]``)."""
        if points:
            return f"{100 * self.value:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def wilson(right: int, total: int, z: float = Z95) -> Interval:
    """The Wilson score interval of ``right / total`` (95% by default)."""
    if total <= 0:
        raise ValueError(f"wilson: total must be positive, got {total}")
    if not 0 <= right <= total:
        raise ValueError(f"wilson: right must lie in [0, {total}], got {right}")
    p = right / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # Exact at the ends (the formula gives 0 at p = 0 and 1 at p = 1 up to rounding).
    low = 0.0 if right == 0 else max(0.0, centre - half)
    high = 1.0 if right == total else min(1.0, centre + half)
    return Interval(p, low, high)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (problems only run A got
    right, only run B got right): ``min(1, 2 P(X <= min))`` with ``X ~ Binomial(a_only + b_only,
    1/2)``; 1 when there are none."""
    if a_only < 0 or b_only < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got {a_only}, {b_only}")
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """Run A against run B on the same ``n`` problems."""

    n: int
    a: Interval            # run A's accuracy (Wilson)
    b: Interval            # run B's accuracy (Wilson)
    difference: Interval   # A - B, percentile bootstrap
    a_only: int            # problems only A got right
    b_only: int            # problems only B got right
    p_value: float         # McNemar's exact test


def paired(a: Sequence[bool], b: Sequence[bool], *, resamples: int = 10_000, seed: int = 0,
           confidence: float = 0.95) -> Paired:
    """Compare two runs' verdicts on the same problems, in the same order (see the module doc).
    The bootstrap is seeded, so the same verdicts always give the same interval."""
    if len(a) != len(b):
        raise ValueError(f"paired: the runs scored different numbers of problems "
                         f"({len(a)} and {len(b)}); pair them by problem first")
    if not a:
        raise ValueError("paired: no problems")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"paired: need resamples >= 1 and 0 < confidence < 1, got "
                         f"{resamples}, {confidence}")
    x = np.asarray(a, dtype=np.int64)
    y = np.asarray(b, dtype=np.int64)
    n = len(x)
    a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    # Resampling n problems with replacement only changes the difference through how many
    # discordant ones it draws of each kind: a multinomial draw of the three cell counts is
    # the same bootstrap without an (resamples x n) index array.
    cells = [a_only / n, b_only / n, (n - a_only - b_only) / n]
    draws = np.random.default_rng(seed).multinomial(n, cells, size=resamples)
    means = (draws[:, 0] - draws[:, 1]) / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Paired(n=n, a=wilson(int(x.sum()), n), b=wilson(int(y.sum()), n),
                  difference=Interval(float((x - y).mean()), float(low), float(high)),
                  a_only=a_only, b_only=b_only, p_value=mcnemar_exact(a_only, b_only))


def pair_by_key(a: dict[str, bool], b: dict[str, bool]) -> tuple[list[str], list[bool], list[bool]]:
    """The problems both runs scored (sorted keys), with each run's verdicts in that order."""
    keys = sorted(set(a) & set(b))
    return keys, [a[k] for k in keys], [b[k] for k in keys]
