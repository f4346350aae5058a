"""Test-time methods, one module each; importing this package registers every one of them.

See `base` for the contract. Modules are discovered, not listed: adding `<name>.py` here that registers a
method is all a new method needs.
"""

from __future__ import annotations

import importlib
import pkgutil

from difftpt_ops.tta.methods.base import (
    ENSEMBLE,
    FORWARD_ONLY,
    KINDS,
    ONLINE,
    PROMPT_TUNING,
    SINGLE_TEMPLATE,
    ContextTuning,
    ForwardOnlyMethod,
    Method,
    OnlineMethod,
    PromptTuningMethod,
    RewardInputs,
    StepInputs,
    StepOutput,
    TuningPlan,
    ViewPlan,
    ViewScores,
    find_method,
    fixed_text_of,
    get_method,
    method_names,
    method_of,
    register,
    registered,
    resolve_for_dataset,
    split_prompt_sets,
    unregister,
)

# Built-in order first (it is the order of --help and `methods list`), then every other module by name.
_FIRST = ("zeroshot", "tpt", "difftpt")


def _load_all() -> None:
    found = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    for name in [*_FIRST, *(n for n in found if n not in _FIRST and n != "base")]:
        importlib.import_module(f"{__name__}.{name}")


_load_all()

__all__ = [
    "ENSEMBLE", "FORWARD_ONLY", "KINDS", "ONLINE", "PROMPT_TUNING", "SINGLE_TEMPLATE", "ContextTuning",
    "ForwardOnlyMethod",
    "Method", "OnlineMethod", "PromptTuningMethod", "RewardInputs", "StepInputs", "StepOutput", "TuningPlan",
    "ViewPlan", "ViewScores", "find_method", "fixed_text_of", "get_method", "method_names", "method_of", "register",
    "registered", "resolve_for_dataset", "split_prompt_sets", "unregister",
]
