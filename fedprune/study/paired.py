"""Means and paired differences over seeds, with Student-t 95% intervals.

A study cell runs every method on the same seeds (same partition, same initial weights
where the method allows), so two methods are compared by their per-seed differences: the
seed-to-seed spread they share cancels, and a paired interval is much tighter than two
separate intervals. A difference whose interval contains zero is reported as not
distinguishable at that number of seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (standard tables)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t_critical(df: int) -> float:
    """t_{0.975, df}: the table up to 30, then the Cornish-Fisher expansion (error
    < 0.001 there)."""
    if df < 1:
        raise ValueError(f"an interval needs at least 2 values (df >= 1), got df={df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float  # nan with one value: no interval
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def distinguishable(self) -> bool:
        """The interval excludes zero (for a difference: the sign is established)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def mean_interval(values: list[float]) -> Interval:
    """Mean and the half-width of its 95% t interval (sample standard deviation)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, math.nan, 1)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Interval(mean, t_critical(n - 1) * math.sqrt(var / n), n)


def weighted_mean_interval(values: list[float], weights: list[float]) -> Interval:
    """Weighted mean and its 95% t interval, treating each value as one unit (e.g. a
    client) of weight ``weights[i]`` (e.g. its examples). The variance is the ratio
    estimator's, n/(n-1) * sum w^2 (v - m)^2 / (sum w)^2, with n - 1 degrees of freedom;
    with equal weights it is exactly ``mean_interval``'s. Why weighted: a choice made on
    example-weighted means (BN selection) must be judged by the same mean, or the two can
    disagree in sign."""
    n = len(values)
    if n == 0 or len(weights) != n:
        raise ValueError(f"{n} values for {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    mean = sum(w * v for w, v in zip(weights, values)) / total
    if n == 1:
        return Interval(mean, math.nan, 1)
    var = n / (n - 1) * sum((w * (v - mean)) ** 2 for w, v in zip(weights, values)) / total ** 2
    return Interval(mean, t_critical(n - 1) * math.sqrt(var), n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """a - b over the seeds both have (per-seed differences, then their t interval)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two methods share no seed")
    return mean_interval([a[s] - b[s] for s in seeds])
