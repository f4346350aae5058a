"""A run's configuration: the settings that set it apart from its method's defaults for its dataset."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.services.reading.configurations import configuration  # noqa: E402
from difftpt_ops.tta.methods import resolve_for_dataset  # noqa: E402

pytestmark = pytest.mark.unit


def _stored(method: str, fmt: str, **overrides: str) -> dict:
    """The run spec `submit` stores: the method spec resolved for the dataset's format."""
    spec = resolve_for_dataset(method_spec_from(method, overrides), fmt)
    return {"kind": "tune", "method": spec.to_dict(), "model": {"name": "ViT-B-16", "pretrained": "openai"}}


@pytest.mark.parametrize(("method", "fmt", "overrides", "expected"), [
    ("tpt", "imagenet-a", {}, ""),
    ("tpt", "imagenet-a", {"steps": "2", "features": "recompute"}, "steps=2"),  # features change no number
    ("tda", "imagenet-a", {}, ""),  # the per-dataset config is the default
    ("tda", "dtd", {"prompts": "single"}, "prompts=single"),
    ("ctpt", "dtd", {}, ""),  # lambda resolved per dataset
    ("dmn-zs", "dtd", {"order_seed": "3"}, ""),  # a seed: a repeat, not another configuration
    ("zeroshot", "imagefolder", {"prompts": "ensemble", "prompt.ctx_init": "a photo of an"},
     'prompt.ctx_init="a photo of an" prompts=ensemble'),
    ("zeroshot", "imagefolder", {"prompt.ctx_init": "a_photo_of_an"}, "prompt.ctx_init=a_photo_of_an"),
])
def test_configuration_words(method: str, fmt: str, overrides: dict[str, str], expected: str) -> None:
    assert configuration(_stored(method, fmt, **overrides), fmt) == expected


def test_runs_stored_before_an_option_show_the_value_they_used() -> None:
    """ZERO before `vote` voted at float32's eps (argmax); DMN-ZS before `crop_min` cropped like TPT (0.08)."""
    for method, key, used in (("zero", "vote", "argmax"), ("dmn-zs", "crop_min", "0.08")):
        stored = _stored(method, "imagefolder")
        del stored["method"][key]
        assert configuration(stored, "imagefolder") == f"{key}={used}"


def test_model_settings_count_against_the_tables_model_and_unreadable_specs_stay_apart() -> None:
    stored = _stored("tpt", "imagenet")
    table_model = {"name": "ViT-B-16", "pretrained": "openai", "precision": "fp16", "activation": "auto"}
    stored["model"]["precision"] = "fp32"  # a CPU run of the table's GPU configuration: not another one
    assert configuration(stored, "imagenet", model=table_model) == ""
    stored["model"]["pretrained"] = "laion2b_s34b_b88k"
    assert configuration(stored, "imagenet", model=table_model) == "model.pretrained=laion2b_s34b_b88k"
    for odd in ({"method": {"method": "tpt", "no_such_option": 1}}, {"method": "tpt"}, {}):
        assert configuration(odd, "imagenet").startswith("spec=")
