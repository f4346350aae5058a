"""Seeded, class-stratified subsets: deterministic, proportional, largest-remainder rounding."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from difftpt_ops.core.errors import InputError
from difftpt_ops.data.subsets import allocate, select_subset

pytestmark = pytest.mark.unit


def samples_with(counts: dict[int, int]) -> list[tuple[int, int]]:
    """(index, label) pairs, class-grouped as a full version lists them."""
    pairs: list[tuple[int, int]] = []
    for label, n in counts.items():
        pairs.extend((len(pairs), label) for _ in range(n))
    return [(i, label) for i, (_, label) in enumerate(pairs)]


def test_same_seed_same_subset_and_other_seed_other_subset() -> None:
    """The subset depends only on the sample list and the seed."""
    samples = samples_with(dict.fromkeys(range(20), 50))
    first = select_subset(samples, 100, seed=3)
    assert first == select_subset(list(reversed(samples)), 100, seed=3)
    assert first != select_subset(samples, 100, seed=4)
    assert len(first) == len(set(first)) == 100


def test_exact_proportions_when_they_are_whole_numbers() -> None:
    """50/30/20 samples -> 5/3/2 of a 10-sample subset."""
    samples = samples_with({0: 50, 1: 30, 2: 20})
    label_of = dict(samples)
    chosen = select_subset(samples, 10, seed=0)
    assert Counter(label_of[i] for i in chosen) == {0: 5, 1: 3, 2: 2}


def test_largest_remainder_gets_the_leftover() -> None:
    """7/2/1 samples, 5 drawn: exact 3.5/1.0/0.5 -> floors 3/1/0, the two 0.5 remainders compete by seed."""
    quotas = allocate({0: 7, 1: 2, 2: 1}, 5, seed=0)
    assert sum(quotas.values()) == 5 and quotas[1] == 1 and {quotas[0], quotas[2]} in ({3, 1}, {4, 0})
    # A larger remainder always wins: 6/3/1 of 10, 4 drawn -> exact 2.4/1.2/0.4 -> 2/1/1 (0.4 beats 0.2).
    assert allocate({0: 6, 1: 3, 2: 1}, 4, seed=9) == {0: 2, 1: 1, 2: 1}


def test_allocation_is_within_one_of_the_exact_share() -> None:
    """For random class sizes, quotas sum to the size and never stray a whole sample from proportional."""
    rng = random.Random(0)
    for _ in range(200):
        counts = {label: rng.randint(1, 60) for label in range(rng.randint(1, 30))}
        total = sum(counts.values())
        size = rng.randint(1, total)
        quotas = allocate(counts, size, seed=rng.randint(0, 100))
        assert sum(quotas.values()) == size
        for label, n in counts.items():
            assert 0 <= quotas[label] <= n
            assert abs(quotas[label] - size * n / total) < 1


def test_order_is_a_seeded_shuffle_not_class_grouped() -> None:
    """A run's first shards mix classes: the subset is not listed class by class."""
    samples = samples_with(dict.fromkeys(range(10), 10))
    chosen = select_subset(samples, 50, seed=1)
    assert chosen != sorted(chosen)
    assert sorted(select_subset(samples, 100, seed=1)) == [i for i, _ in samples]


def test_bad_sizes_and_seeds_name_the_option() -> None:
    """0, more than available, a negative seed: InputError naming --subset or --seed."""
    samples = samples_with({0: 3, 1: 2})
    for size in (0, 6):
        with pytest.raises(InputError) as info:
            select_subset(samples, size, seed=0)
        assert info.value.argument == "--subset" and info.value.value == size
    with pytest.raises(InputError, match="--seed"):
        select_subset(samples, 2, seed=-1)
