"""Statistics behind `results` and `compare`: Wilson, Newcombe, exact McNemar, ECE."""

from __future__ import annotations

import math
import random

import pytest

from difftpt_ops.services.reading import stats

pytestmark = pytest.mark.unit


def test_wilson_interval_matches_the_formula() -> None:
    """Wilson score interval of 7/10 at 95%, computed by hand."""
    z, n, p = stats.Z_95, 10, 0.7
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert stats.wilson_interval(7, 10) == pytest.approx((centre - half, centre + half))
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)


def test_newcombe_interval_by_hand() -> None:
    """Method 10 on a table with negative association (phi used unshrunk)."""
    a, b, c, d = 36, 12, 2, 0
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = stats.wilson_interval(a + b, n)
    l2, u2 = stats.wilson_interval(a + c, n)
    phi = (a * d - b * c) / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    low = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = p1 - p2 + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    assert stats.paired_difference_interval(a, b, c, d) == pytest.approx((low, high))
    assert low < p1 - p2 < high


def test_newcombe_interval_shrinks_positive_association() -> None:
    """With ad > bc, phi uses max(ad - bc - n/2, 0) (Newcombe 1998; Altman 2000)."""
    a, b, c, d = 50, 5, 10, 35
    n = a + b + c + d
    phi = (a * d - b * c - n / 2) / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, _ = stats.wilson_interval(a + b, n)
    _, u2 = stats.wilson_interval(a + c, n)
    low = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    assert stats.paired_difference_interval(a, b, c, d)[0] == pytest.approx(low)


@pytest.mark.parametrize("table", [(0, 0, 0, 10), (10, 0, 0, 0), (5, 5, 0, 0), (1, 0, 0, 0), (0, 0, 0, 0)])
def test_newcombe_interval_stays_in_range_at_the_edges(table: tuple[int, int, int, int]) -> None:
    """Degenerate tables give an interval inside [-1, 1] that contains the estimate."""
    low, high = stats.paired_difference_interval(*table)
    n = sum(table)
    estimate = (table[1] - table[2]) / n if n else 0.0
    assert -1.0 <= low <= estimate <= high <= 1.0


@pytest.mark.parametrize(("only_a", "only_b"), [(12, 2), (2, 12), (5, 5), (0, 3), (1, 0), (40, 25), (700, 640)])
def test_mcnemar_is_the_exact_two_sided_binomial_tail(only_a: int, only_b: int) -> None:
    """The exact McNemar p-value is min(1, 2 P[X <= min(b, c)]), X ~ Binomial(b + c, 1/2), summed exactly."""
    n = only_a + only_b
    expected = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n)
    assert stats.mcnemar_exact_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_without_discordant_pairs_is_one() -> None:
    assert stats.mcnemar_exact_p(0, 0) == 1.0


def test_ece_matches_a_direct_computation() -> None:
    """Binning by (i/15, (i+1)/15] then weighting |acc - conf| by bin size."""
    rng = random.Random(1)
    samples = [(rng.random(), rng.random() < 0.6) for _ in range(500)] + [(0.0, False), (1.0, True)]
    bins: dict[int, list[tuple[float, bool]]] = {}
    for conf, right in samples:
        bins.setdefault(stats.confidence_bin(conf), []).append((conf, right))
    direct = sum(len(items) / len(samples) * abs(sum(r for _, r in items) / len(items)
                                                 - sum(c for c, _ in items) / len(items)) for items in bins.values())
    counted = [stats.CalibrationBin(i, len(items), sum(r for _, r in items), sum(c for c, _ in items))
               for i, items in bins.items()]
    assert stats.expected_calibration_error(counted) == pytest.approx(direct)
    assert stats.expected_calibration_error([]) is None


def test_confidence_bins_are_right_closed() -> None:
    assert stats.confidence_bin(0.0) == 0
    assert stats.confidence_bin(1 / 15) == 0
    assert stats.confidence_bin(1 / 15 + 1e-9) == 1
    assert stats.confidence_bin(1.0) == 14


def test_the_ece_bin_sql_writes_a_plain_integer() -> None:
    """The bin count is written into the SQL: only a plain integer reaches it, whatever an int subclass prints."""
    from difftpt_ops.services.reading.results import confidence_bin_sql

    class Sneaky(int):
        def __format__(self, spec: str) -> str:
            return "1) OR (1=1"

        __str__ = __repr__ = lambda self: "1) OR (1=1"  # type: ignore[assignment]

    for dialect in ("sqlite", "postgresql"):
        sql = confidence_bin_sql(dialect, Sneaky(20))
        assert "OR" not in sql and "20" in sql and "19" in sql
