"""TDA, DMN-ZS, DPE and BoostAdapter classify with their references' class text features: per-dataset
templates, resolved at submit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InvalidSpecError  # noqa: E402
from difftpt_ops.core.method_specs import DATASET_PROMPT_SETS, method_spec_from  # noqa: E402
from difftpt_ops.data.formats import CROSS_DOMAIN_FORMATS, IMAGENET_FORMATS  # noqa: E402
from difftpt_ops.models.clip import LoadedClip  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.methods import get_method  # noqa: E402
from difftpt_ops.tta.methods.boostadapter import BoostAdapterSpec  # noqa: E402
from difftpt_ops.tta.methods.dmn import DMNSpec  # noqa: E402
from difftpt_ops.tta.methods.dpe import DPESpec  # noqa: E402
from difftpt_ops.tta.methods.ensemble import prompt_templates  # noqa: E402
from difftpt_ops.tta.methods.tda import TDASpec  # noqa: E402
from tests.unit.test_method_ensemble import clip_ensemble  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, tiny_clip  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

# What the reference code bases build their classifiers from, per dataset (kdiAAA/TDA datasets/*.py `template`;
# YBZh/DMN `ID_to_prompts` and tip_imagenet_templates), written out here independently of the method modules.
TDA_TEMPLATES = {
    "imagenet": "tip", "imagenet-a": "tip", "imagenet-v2": "tip", "imagenet-r": "ensemble",
    "imagenet-sketch": "ensemble", "caltech101": "tip", "cars": "tip", "sun397": "tip",
    "dtd": ["{} texture."], "eurosat": ["a centered satellite photo of {}."],
    "aircraft": ["a photo of a {}, a type of aircraft."], "food101": ["a photo of {}, a type of food."],
    "flower102": ["a photo of a {}, a type of flower."], "pets": ["a photo of a {}, a type of pet."],
    "ucf101": ["a photo of a person doing {}."],
}
DMN_TEMPLATES = {**TDA_TEMPLATES, **{fmt: "tip" for fmt in IMAGENET_FORMATS},
                 "cars": ["a photo of a {}, a type of car."]}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


def _templates(value: str | list[str]) -> tuple[str, ...]:
    return prompt_templates(value) if isinstance(value, str) else tuple(value)


@pytest.mark.parametrize(("method", "expected"), [("tda", TDA_TEMPLATES), ("dmn-zs", DMN_TEMPLATES),
                                                  ("boostadapter", TDA_TEMPLATES)])
def test_each_dataset_resolves_to_the_references_templates(method: str, expected: dict[str, object]) -> None:
    resolver = get_method(method).resolve_for_dataset  # type: ignore[attr-defined]
    for dataset_format in (*IMAGENET_FORMATS, *CROSS_DOMAIN_FORMATS):
        spec = resolver(method_spec_from(method), dataset_format)
        assert prompt_templates(spec.prompts) == _templates(expected[dataset_format]), dataset_format  # type: ignore[arg-type]
    assert resolver(method_spec_from(method), "imagefolder").prompts == "single"
    assert resolver(method_spec_from(method, {"prompts": "single"}), "imagenet-r").prompts == "single"


def test_dataset_prompt_sets_are_one_template_each() -> None:
    for name in DATASET_PROMPT_SETS:
        templates = prompt_templates(name)
        assert len(templates) == 1 and templates[0].count("{}") == 1


@pytest.mark.parametrize(("spec", "prompt_set"), [(TDASpec(prompts="tip"), "tip"),
                                                  (DMNSpec(prompts="dtd"), "dtd"),
                                                  (TDASpec(prompts="ensemble"), "ensemble")])
def test_online_tuner_classifies_with_the_prompt_sets_features(clip: LoadedClip, spec: object,
                                                                prompt_set: str) -> None:
    """The text features the online step sees are CLIP's recipe over the set's templates (oracle: encode_text)."""
    tuner = prepare_classifier(clip, CLASS_NAMES, spec)  # type: ignore[arg-type]
    text = tuner._initial_text_features()  # noqa: SLF001 - what every online step reads
    torch.testing.assert_close(text.float(), clip_ensemble(clip, prompt_templates(prompt_set)), atol=1e-5, rtol=0)


def test_unresolved_or_single_prompts_keep_the_specs_prompt(clip: LoadedClip) -> None:
    """A spec stored before the field existed (None) and `single` read the prompt learner's initial features."""
    for spec in (TDASpec(), TDASpec(prompts="single"), DMNSpec()):
        tuner = prepare_classifier(clip, CLASS_NAMES, spec)
        assert tuner._initial_text is None  # noqa: SLF001 - no fixed features: the prompt learner's are used
    single = prepare_classifier(clip, CLASS_NAMES, TDASpec())._initial_text_features()  # noqa: SLF001
    assert not torch.allclose(single.float(), clip_ensemble(clip, prompt_templates("tip")), atol=1e-3)


@pytest.mark.parametrize("method", ["tda", "dmn-zs", "dpe", "boostadapter"])
def test_an_unknown_prompt_set_is_refused_naming_it(method: str) -> None:
    with pytest.raises(InvalidSpecError, match="prompts.*photos"):
        method_spec_from(method, {"prompts": "photos"})


@pytest.mark.parametrize("spec_class", [TDASpec, DMNSpec, DPESpec, BoostAdapterSpec])
def test_single_is_left_out_of_the_stored_spec_so_older_runs_keep_their_identity(spec_class: type) -> None:
    """Runs stored before `prompts` existed used the single prompt: an explicit `single` stores the same dict,
    and reads back as `single` (not as None, which a resolve per dataset would turn into its templates)."""
    from difftpt_ops.core.method_specs import method_spec_from_dict

    single = spec_class(prompts="single").to_dict()
    assert "prompts" not in single and spec_class(prompts="tip").to_dict()["prompts"] == "tip"
    assert method_spec_from_dict(single).prompts == "single"
    assert method_spec_from_dict(single).to_dict() == single


@pytest.mark.parametrize("spec", [TDASpec(prompts="tip", n_views=4), DMNSpec(prompts="dtd", n_views=4),
                                  TDASpec(prompts="ensemble"), DPESpec(prompts="cars-dpe", n_views=16),
                                  DPESpec(prompts="tip", predict_from_kept=True, n_views=16),
                                  BoostAdapterSpec(prompts="dtd", n_views=20, summary_from_original=True)],
                         ids=["tda-tip", "dmn-dtd", "tda-ensemble", "dpe-cars", "dpe-kept", "boost-dtd"])
def test_engine_equals_the_naive_formulation_with_a_prompt_set(clip: LoadedClip, spec: object) -> None:
    """The oracle reads the same class text features as the engine, and both carry the state in order."""
    from difftpt_ops.tta.naive import NaiveTuner
    from tests.unit.tta_support import random_image

    fast = prepare_classifier(clip, CLASS_NAMES, spec)  # type: ignore[arg-type]
    naive = NaiveTuner(clip, CLASS_NAMES, spec)  # type: ignore[arg-type]
    assert naive.fixed_text is not None
    for sample in range(4):
        image = random_image(sample)
        a = fast.run(image, seed=5, sample_key=sample)
        b = naive.run(image, seed=5, sample_key=sample)
        assert (a.pred, a.top5) == (b.pred, b.top5), f"sample {sample}"
