"""The statistics of a comparison between rows: intervals over seeds and paired differences.

A table cell is a mean over training seeds; the comparison a reader makes is a difference
between two rows. Both come with a 95% confidence interval from Student's t distribution:

- :func:`mean_interval`: mean ± t₀.₉₇₅,ₙ₋₁ · s/√n over the n seeds of one row;
- :func:`paired_difference`: the row minus the baseline, seed by seed, over the seeds both
  have (the paired t interval). Two rows that share a seed share everything the objective does
  not change (initial weights where the shapes agree, data order, the evaluation's x_T), so
  their errors are positively correlated and Var(A − B) = Var(A) + Var(B) − 2 Cov(A, B) is
  smaller than for independent runs: pairing is what makes a difference resolvable.

Why t and not a bootstrap: with n = 5 seeds the bootstrap's percentile interval under-covers
badly (it can never be wider than the range of five numbers), while the t interval is exact
for normal errors and robust enough for a mean of five. A difference is *resolved* when its
interval excludes zero.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

__all__ = ["LEVEL", "Interval", "mean_interval", "paired_difference"]

#: Confidence level of every interval in the tables and figures.
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval ``[low, high]`` over ``n`` values (NaN bounds when
    n < 2: one value has no spread)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    @property
    def resolved(self) -> bool:
        """The interval excludes zero (for a difference: the rows differ at this level)."""
        return self.n >= 2 and (self.low > 0.0 or self.high < 0.0)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and Student-t interval of ``values`` (at least one).

    Raises:
        ValueError: no values, or a level outside (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: a confidence level lies strictly between 0 and 1")
    data = [float(v) for v in values]
    if not data:
        raise ValueError("mean_interval needs at least one value")
    mean = statistics.fmean(data)
    n = len(data)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(student_t.ppf(0.5 + level / 2.0, n - 1)) * statistics.stdev(data) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(
    row: Mapping[int, float], baseline: Mapping[int, float], level: float = LEVEL
) -> Interval | None:
    """``row − baseline`` over the seeds both have: mean and paired-t interval, or None when
    they share no seed.

    Args:
        row, baseline: ``{seed: value}`` of the two rows (finite values only).
    """
    seeds = sorted(set(row) & set(baseline))
    if not seeds:
        return None
    return mean_interval([row[s] - baseline[s] for s in seeds], level)
