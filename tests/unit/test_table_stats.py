"""Holm's step-down correction and the table's text helpers."""

from __future__ import annotations

import pytest

from difftpt_ops.services.reading.stats import holm_adjust
from difftpt_ops.services.reading.table import seed_group_key
from difftpt_ops.services.reading.table_model import Cell, paper_average
from difftpt_ops.services.reading.table_render import cell_text, latex_escape

pytestmark = pytest.mark.unit


def test_holm_on_a_known_vector() -> None:
    """Sorted p (0.005, 0.01, 0.03, 0.04) times (4, 3, 2, 1), running max, back in input order."""
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_keeps_ties_and_empty() -> None:
    """Large products cap at 1; equal p get equal adjusted p; no p-values, no output."""
    assert holm_adjust([0.5, 0.5, 0.9]) == pytest.approx([1.0, 1.0, 1.0])
    assert holm_adjust([0.01, 0.01]) == pytest.approx([0.02, 0.02])
    assert holm_adjust([]) == []


def test_holm_matches_bonferroni_for_the_smallest_and_never_decreases() -> None:
    """The smallest p is multiplied by m; adjusted p are monotone in the raw p."""
    p = [0.2, 0.001, 0.04, 0.012, 0.3]
    adjusted = holm_adjust(p)
    assert adjusted[1] == pytest.approx(0.005)
    order = sorted(range(len(p)), key=p.__getitem__)
    assert [adjusted[i] for i in order] == sorted(adjusted)


def test_missing_cells_render_as_a_dash_never_zero() -> None:
    """No run or no value is '–'; a real 0% is '0.00'."""
    assert cell_text(None, "ours") == "–"
    assert cell_text(Cell(dataset="x"), "ours") == "–"
    assert cell_text(Cell(dataset="x", value=0.0), "ours") == "0.00"
    marked = cell_text(Cell(dataset="x", value=0.5, std=0.01, significant=True, subset=True), "ours")
    assert marked == "50.00 ±1.00*†"


def test_paper_average_needs_every_format_once() -> None:
    """Mean only when each format of the group has exactly one column with a value."""
    formats = {"a": "imagenet-a", "r": "imagenet-r"}
    assert paper_average({"a": 0.2, "r": 0.4}, formats, ("imagenet-a", "imagenet-r")) == pytest.approx(0.3)
    assert paper_average({"a": 0.2, "r": None}, formats, ("imagenet-a", "imagenet-r")) is None
    assert paper_average({"a": 0.2}, {"a": "imagenet-a"}, ("imagenet-a", "imagenet-r")) is None


def test_seed_group_key_ignores_seeds_and_what_is_no_configuration() -> None:
    """Specs equal up to seed, device, precision and `features` share a key (a configuration's repeats may run
    on other devices); any setting that is a configuration word separates them."""
    base = {"method": {"method": "tpt", "steps": 1}, "model": {"name": "m", "precision": "fp16"}, "seed": 0,
            "device": "cuda"}
    assert seed_group_key(base) == seed_group_key({**base, "seed": 3})
    assert seed_group_key(base) == seed_group_key({**base, "device": "cpu", "model": {"name": "m", "precision": "fp32"},
                                                   "method": {"method": "tpt", "steps": 1, "features": "recompute"}})
    assert seed_group_key(base) != seed_group_key({**base, "method": {"method": "tpt", "steps": 2}})
    assert seed_group_key(base) != seed_group_key({**base, "model": {"name": "m", "precision": "fp16",
                                                                     "pretrained": "laion2b_s34b_b88k"}})


def test_latex_escape() -> None:
    """Underscores, ampersands and percent signs cannot break a tabular."""
    assert latex_escape("a_b & 5%") == r"a\_b \& 5\%"


def test_vectorised_mcnemar_equals_scipy_binomtest() -> None:
    """The table's batch McNemar equals scipy.stats.binomtest(only_a, only_a + only_b, 0.5) pair by pair."""
    from scipy.stats import binomtest

    from difftpt_ops.services.reading.stats import mcnemar_exact_p_many

    pairs = [(0, 0), (3, 3), (0, 9), (9, 0), (12, 30), (410, 389), (1, 700), (250, 0)]
    expected = [1.0 if a + b == 0 else binomtest(a, a + b, 0.5).pvalue for a, b in pairs]
    assert mcnemar_exact_p_many(pairs) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert mcnemar_exact_p_many([]) == []
