"""What configuration of its method a run is: the settings that set it apart from the method's reference
defaults for its dataset, as `key=value` words ("" at the defaults).

Tables and comparisons group runs by it, so that `zeroshot` and `zeroshot --set prompts=ensemble` are two
rows, not one cell that shows whichever ran last. Defaults resolved per dataset (TDA's config, C-TPT's
lambda, the online methods' prompt sets) count as defaults; seeds and settings that cannot change a number
(`features`: read from the store or recomputed) do not count. A run stored before an option existed reads it
at the value it used, which shows when today's default differs (`zero vote=argmax`).
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import MethodSpec, method_spec_from, method_spec_from_dict, resolve_for_dataset
from difftpt_ops.core.specs import ModelSpec, fingerprint_of, flatten

SEED_KEYS = ("seed", "order_seed")  # spec keys whose runs are repeats of one configuration
NO_EFFECT_KEYS = ("features",)
# Besides the name, which a table selects on. Not precision: submit derives it from the device (fp16 frozen
# weights on CUDA), and a CPU run of a GPU configuration is the same configuration, to rounding.
MODEL_KEYS = ("pretrained", "activation")
_DEFAULT_MODEL = ModelSpec()


def configuration(spec: dict[str, Any], dataset_format: str, *, model: dict[str, Any] | None = None) -> str:
    """The run's settings that differ from its method's reference defaults for `dataset_format`, then its model
    settings that differ from `model` (the table's model, when given), as sorted `key=value` words."""
    try:
        method = method_spec_from_dict(spec["method"])
    except (InvalidSpecError, KeyError, TypeError, ValueError):  # a spec today's code cannot read: keep it apart
        return f"spec={fingerprint_of(spec.get('method'))[:8]}"
    ours = flatten(method.all_fields())
    reference = flatten(_reference(method.method, dataset_format).all_fields())
    words = [f"{key}={_shown(value)}" for key, value in sorted(ours.items())
             if key not in SEED_KEYS and key not in NO_EFFECT_KEYS and reference.get(key, value) != value]
    if model is not None:
        ours_model, table_model = _model_settings(spec.get("model") or {}), _model_settings(model)
        words += [f"model.{key}={_shown(ours_model[key])}" for key in MODEL_KEYS
                  if ours_model[key] != table_model[key]]
    return " ".join(words)


def _model_settings(model: dict[str, Any]) -> dict[str, Any]:
    """A stored model spec with the fields it lacks at ModelSpec's defaults, as the run spec reads it back."""
    return {key: model.get(key, getattr(_DEFAULT_MODEL, key)) for key in MODEL_KEYS}


@cache
def _reference(method: str, dataset_format: str) -> MethodSpec:
    return resolve_for_dataset(method_spec_from(method), dataset_format)


def _shown(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:15]  # a descriptions file's content key: enough to tell two apart
    if isinstance(value, str) and (not value or any(c.isspace() or c in "\"'" for c in value)):
        return json.dumps(value)  # quoted, as typed: `a photo of` and `a_photo_of` are two configurations
    return "none" if value is None else str(value)
