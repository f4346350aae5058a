"""Seeded, class-stratified subsets (DiffTPT evaluates 1,000 images per set and lost its lists).

The rule (SUBSET_RULE), given the full version's ok samples as (index, label) and a seed S:

1. Allocation: class c with n_c of the N ok samples gets floor(size * n_c / N) samples; the
   `size - sum(floors)` left over go one each to the classes with the largest remainders
   (size * n_c mod N), ties broken by a seeded hash of the label (largest-remainder rounding).
2. Selection: within a class, samples are ranked by sha256("S:sample:<index>") and the first
   quota are taken.
3. Order: the chosen samples are ordered by sha256("S:order:<index>"), a seeded shuffle, so any
   prefix of a run (an interrupted one, the first shards) mixes the classes as the whole does.

Only sha256 and integer arithmetic are involved, so the subset is the same on every Python version.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

from difftpt_ops.core.errors import InputError

SUBSET_RULE = "stratified-largest-remainder-sha256-v1"
MAX_SEED = 2**31 - 1  # the seed is stored in a 32-bit column


def _rank(seed: int, kind: str, value: int) -> bytes:
    return hashlib.sha256(f"{seed}:{kind}:{value}".encode()).digest()


def check_subset_args(size: int, seed: int, available: int | None = None) -> None:
    """Raise InputError naming --subset or --seed when they cannot make a subset."""
    if size < 1:
        raise InputError("--subset", size, "must be >= 1")
    if not 0 <= seed <= MAX_SEED:
        raise InputError("--seed", seed, f"must be in 0..{MAX_SEED}")
    if available is not None and size > available:
        raise InputError("--subset", size, f"is more than the {available} readable samples of the dataset")


def allocate(counts: dict[int, int], size: int, seed: int) -> dict[int, int]:
    """Samples per label: proportional to `counts`, largest-remainder rounding, seeded tie-break."""
    total = sum(counts.values())
    quotas = {label: size * n // total for label, n in counts.items()}
    left = size - sum(quotas.values())
    by_remainder = sorted(counts, key=lambda label: (-(size * counts[label] % total), _rank(seed, "class", label)))
    for label in by_remainder[:left]:
        quotas[label] += 1
    return quotas


def select_subset(samples: Iterable[tuple[int, int]], size: int, seed: int) -> list[int]:
    """Indices of the subset, in subset order, from the ok samples given as (index, label).

    Raises:
        InputError: `size` < 1, more than the samples given, or a seed out of range.
    """
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, label in samples:
        by_label[label].append(index)
    check_subset_args(size, seed, sum(len(members) for members in by_label.values()))
    quotas = allocate({label: len(members) for label, members in by_label.items()}, size, seed)
    chosen: list[int] = []
    for label, members in by_label.items():
        ranked = sorted(members, key=lambda index: _rank(seed, "sample", index))
        chosen.extend(ranked[:quotas[label]])
    return sorted(chosen, key=lambda index: _rank(seed, "order", index))
