"""Statistics over seeds: means with 95% t-intervals, and how the tables print them.

Every interval in the reports is a two-sided Student t-interval of the mean over independent
seeds, ``mean ± t(0.975, k - 1) * s / sqrt(k)`` with the sample standard deviation ``s`` of ``k``
values. With one value there is no interval; the table says so rather than print ``± 0``.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``count`` values and the half-width of its t-interval (nan for one value)."""

    mean: float
    half_width: float
    count: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` with its two-sided Student t confidence interval."""
    if not values:
        raise ValueError("t_interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Interval(mean, math.nan, 1)
    quantile = float(scipy_stats.t.ppf(0.5 + confidence / 2, len(values) - 1))
    half = quantile * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, half, len(values))


def decimals_for(value: float, digits: int) -> int:
    """Decimal places that keep ``digits`` significant digits of ``value``."""
    magnitude = math.floor(math.log10(abs(value))) if value else 0
    return max(0, digits - 1 - magnitude)


def mean_ci(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± half-width`` of the 95% t-interval, both to the mean's precision.

    One value prints as the value alone; no value prints as an em dash.
    """
    if not values:
        return "—"
    interval = t_interval(values)
    decimals = decimals_for(interval.mean, digits)
    if interval.count == 1:
        return f"{interval.mean:.{decimals}f}"
    return f"{interval.mean:.{decimals}f} ± {interval.half_width:.{decimals}f}"


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test that ``a`` and ``b`` have the same mean."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return 0.0 if statistics.fmean(a) != statistics.fmean(b) else 1.0
    with warnings.catch_warnings():  # nearly equal values: scipy warns, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)


def p_text(p: float) -> str:
    """A p-value as a table prints it."""
    if math.isnan(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
