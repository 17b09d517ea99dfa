"""Paired comparisons of methods across cases.

For two methods A and B with values ``a_i``, ``b_i`` on the same cases i = 1..n (pairs with a NaN
dropped), the paired differences ``d_i = a_i - b_i`` give:

- the mean difference and its percentile bootstrap 95% interval (``resamples`` resamples of the
  cases with replacement, seeded);
- the Wilcoxon signed-rank test (two-sided; exact for small n without ties, zero differences
  dropped as in Wilcoxon's original method): its p-value, NaN when every difference is zero or
  fewer than 2 pairs remain. With n cases the smallest possible two-sided p is ``2 / 2^n``
  (0.0625 for 5 cases): a small table can never reach 0.05.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap 95% interval (NaN without enough values)."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class PairedComparison:
    """A - B over the cases both have: mean difference with its interval, and the Wilcoxon p-value."""

    difference: Interval
    wilcoxon_p: float


def bootstrap_mean(values, *, resamples: int = 10000, seed: int = 0) -> Interval:
    """The mean of finite ``values`` and its percentile bootstrap 95% interval."""
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    if data.size == 1:
        return Interval(float(data[0]), float("nan"), float("nan"), 1)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(data.mean()), float(low), float(high), int(data.size))


def paired_comparison(a, b, *, resamples: int = 10000, seed: int = 0) -> PairedComparison:
    """Compare A with B on the same cases (see the module docstring)."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    differences = a[keep] - b[keep]
    interval = bootstrap_mean(differences, resamples=resamples, seed=seed)
    nonzero = differences[differences != 0]
    p = float("nan")
    if nonzero.size >= 1 and differences.size >= 2:
        p = float(wilcoxon(nonzero, alternative="two-sided").pvalue)
    return PairedComparison(interval, p)
