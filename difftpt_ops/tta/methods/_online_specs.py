"""Checks and view rules the online methods' specs share (TDA, DPE, BoostAdapter).

A private module: the package imports every public module as a method; this one registers nothing.
"""

from __future__ import annotations

from typing import Any

from difftpt_ops.core.method_specs import check_descriptions, check_view_count
from difftpt_ops.core.specs import require
from difftpt_ops.tta.methods.base import ViewPlan
from difftpt_ops.tta.methods.ensemble import check_prompt_set


def or_default(value: float | None, default: float) -> float:
    """A spec field left None (resolved per dataset), or its own value."""
    return default if value is None else value


def check_stream_settings(spec: Any) -> None:
    """The settings of a cache-based online spec: order seed, prompts, descriptions, views and selection."""
    require(spec.order_seed >= 0, "order_seed", spec.order_seed, "must be >= 0")
    if spec.prompts is not None:
        check_prompt_set(spec.prompts)
    check_descriptions(spec.descriptions)
    if spec.n_views is not None:
        check_view_count(spec.n_views)
    require(0.0 < spec.selection_p <= 1.0, "selection_p", spec.selection_p, "must be in (0, 1]")


def check_non_negative(spec: Any, *names: str) -> None:
    """Each named field is None (resolved per dataset) or >= 0."""
    for name in names:
        value = getattr(spec, name)
        require(value is None or value >= 0, name, value, "must be >= 0")


def check_two_caches(spec: Any) -> None:
    """TDA's cache settings (TDA, BoostAdapter): capacities, alphas and betas, ordered thresholds."""
    for name in ("pos_shot_capacity", "neg_shot_capacity"):
        require(getattr(spec, name) >= 1, name, getattr(spec, name), "must be >= 1")
    check_non_negative(spec, "pos_alpha", "pos_beta", "neg_alpha", "neg_beta")
    require(spec.entropy_lower < spec.entropy_upper, "entropy_lower", spec.entropy_lower,
            f"must be below entropy_upper ({spec.entropy_upper})")
    require(spec.mask_lower < spec.mask_upper, "mask_lower", spec.mask_lower,
            f"must be below mask_upper ({spec.mask_upper})")


def original_plus_crops(spec: Any) -> ViewPlan:
    """The original and n_views - 1 crops (1 view while unresolved), AugMix exactly when several unless set:
    the TDA and DPE loaders' rule."""
    n_views = spec.n_views or 1
    augmix = n_views > 1 if spec.augmix is None else spec.augmix
    return ViewPlan(n_conventional=n_views - 1, augmix=augmix, resolution=spec.resolution)
