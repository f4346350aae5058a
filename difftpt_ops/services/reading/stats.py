"""Small, dependency-free statistics for results: Wilson and Newcombe intervals, exact McNemar, ECE.

Everything here takes counts (already aggregated in SQL), never per-sample rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from difftpt_ops.core.errors import InputError

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
ECE_BINS = 15  # the calibration literature's usual bin count; --ece-bins 20 is C-TPT's code's
MAX_ECE_BINS = 1000


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_interval(both: int, only_a: int, only_b: int, neither: int,
                               z: float = Z_95) -> tuple[float, float]:
    """Confidence interval of acc(A) - acc(B) on paired samples: Newcombe (1998), method 10.

    Hybrid score interval: the Wilson intervals of both marginal accuracies, combined with the phi
    correlation of the 2x2 table (both right, only A, only B, neither). Unlike the Wald interval it
    stays inside [-1, 1] and keeps its coverage near 0 or 1 accuracy, where the Wald interval collapses.
    """
    n = both + only_a + only_b + neither
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    phi = _phi(both, only_a, only_b, neither)
    delta = p1 - p2
    lower = delta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = delta + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return max(-1.0, lower), min(1.0, upper)


def _phi(a: int, b: int, c: int, d: int) -> float:
    """Phi of the 2x2 table [[a, b], [c, d]] as Newcombe uses it; 0 when a margin is empty.

    A positive association is shrunk by n/2 (max(ad - bc - n/2, 0)), as in Newcombe (1998) and
    Altman et al., "Statistics with Confidence" (2000), p. 52.
    """
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    if denom == 0:
        return 0.0
    cross = a * d - b * c
    if cross > 0:
        cross = max(cross - (a + b + c + d) / 2, 0.0)
    return cross / math.sqrt(denom)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: scipy's binomial test of the discordant pairs against 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    from scipy.stats import binomtest  # scipy's import costs ~0.3 s; only `compare` pays it

    return float(binomtest(only_a, n, 0.5).pvalue)


@dataclass(frozen=True)
class CalibrationBin:
    """One confidence bin: samples in it, how many were right, and the summed confidence."""

    index: int
    count: int
    correct: int
    confidence_sum: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / self.count if self.count else 0.0


def expected_calibration_error(bins: Iterable[CalibrationBin]) -> float | None:
    """ECE = sum over bins of (n_bin / N) * |accuracy_bin - mean confidence_bin|; None without samples."""
    bins = list(bins)
    total = sum(b.count for b in bins)
    if total == 0:
        return None
    return sum(b.count / total * abs(b.accuracy - b.mean_confidence) for b in bins if b.count)


def check_ece_bins(n_bins: int) -> int:
    """`n_bins` when it is a bin count ECE can use (an integer from 1 to MAX_ECE_BINS), else InputError."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or not 1 <= n_bins <= MAX_ECE_BINS:
        raise InputError("--ece-bins", n_bins, f"must be an integer from 1 to {MAX_ECE_BINS}")
    return int(n_bins)  # a plain int: an int subclass could print anything into the SQL that interpolates it


def confidence_bin(confidence: float, n_bins: int = ECE_BINS) -> int:
    """Bin of a confidence: bins are (i/n, (i+1)/n], confidence 0 goes to bin 0 (the SQL does the same)."""
    return min(n_bins - 1, max(0, math.ceil(confidence * n_bins) - 1))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values, in the input order.

    Sorted ascending, p_(i) is multiplied by (m - i) (i from 0), made non-decreasing by a running
    maximum and capped at 1. Rejecting where the adjusted p < alpha controls the family-wise error
    rate at alpha, like Bonferroni, but rejects at least as much.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def mcnemar_exact_p_many(discordant: Sequence[tuple[int, int]]) -> list[float]:
    """`mcnemar_exact_p` for many (only_a, only_b) pairs in one vectorised call (a table has hundreds).

    With p = 1/2 the binomial is symmetric, so binomtest's two-sided p-value is
    min(1, 2 * P[X <= min(only_a, only_b)]); scipy's binom.cdf computes all of them at once.
    """
    if not discordant:
        return []
    from scipy.stats import binom

    low = [min(a, b) for a, b in discordant]
    n = [a + b for a, b in discordant]
    cdf = binom.cdf(low, n, 0.5)
    return [1.0 if total == 0 else min(1.0, 2.0 * float(c)) for total, c in zip(n, cdf, strict=True)]
