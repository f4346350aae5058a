"""Prompt ensembles: the shipped template lists, class features against CLIP's own encode_text, the option."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InvalidSpecError  # noqa: E402
from difftpt_ops.core.method_specs import ZeroShotSpec, method_spec_from, method_spec_from_dict  # noqa: E402
from difftpt_ops.models.clip import LoadedClip  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.methods import get_method  # noqa: E402
from difftpt_ops.tta.methods.ensemble import (  # noqa: E402
    ensemble_text_features,
    prompt_templates,
    template_texts,
)
from difftpt_ops.tta.methods.mta import MTASpec, mta_predict  # noqa: E402
from difftpt_ops.tta.methods.zero import ZeroSpec, zero_predict  # noqa: E402
from difftpt_ops.tta.text import TextTower  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, random_image, tiny_clip  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

# openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb, `imagenet_templates`, in its order (the same
# list and order as kdiAAA/TDA datasets/imagenet_r.py and imagenet_sketch.py and YBZh/DMN data/imagnet_prompts.py),
# written out here independently of the shipped JSON.
CLIP_80 = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)
# The 7 templates the notebook's forward selection picked, in the order gaopengcuhk/Tip-Adapter
# (tip_adapter_ImageNet.py) and kdiAAA/TDA (datasets/imagenet.py, imagenet_a.py, imagenetv2.py) list them ...
TIP_ADAPTER_7 = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
# ... and in the order of YBZh/DMN data/imagnet_prompts.py `tip_imagenet_templates`, the order shipped here.
DMN_TIP_7 = ("a bad photo of the {}.", "a {} in a video game.", "a origami {}.", "a photo of the small {}.",
             "art of the {}.", "a photo of the large {}.", "itap of a {}.")
# zhangce01/DPE-CLIP datasets/stanford_cars.py `template`.
DPE_CARS = ("a photo of a {}.", "A {} featuring a wide range of color options for easy selection.")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


def clip_ensemble(clip: LoadedClip, templates: tuple[str, ...],
                  descriptions: dict[str, list[str]] | None = None) -> torch.Tensor:
    """CLIP's recipe with its own encode_text on padded 77-token prompts: normalise, average, normalise. With
    `descriptions` (keyed by name with spaces), DMN's tip_cupl: a class's sentences join its templates' texts."""
    per_class = []
    with torch.no_grad():
        for name in CLASS_NAMES:
            name = name.replace("_", " ")
            texts = [t.format(name) for t in templates] + (descriptions[name] if descriptions is not None else [])
            features = clip.model.encode_text(clip.tokenizer(texts)).float()
            features = features / features.norm(dim=-1, keepdim=True)
            mean = features.mean(dim=0)
            per_class.append(mean / mean.norm())
    return torch.stack(per_class)


def test_shipped_template_lists() -> None:
    ensemble, tip = prompt_templates("ensemble"), prompt_templates("tip")
    assert len(ensemble) == 80 and len(set(ensemble)) == 80 and all(t.count("{}") == 1 for t in ensemble)
    assert len(tip) == 7 and set(tip) <= set(ensemble)
    assert ensemble[0] == "a bad photo of a {}." and "a photo of a {}." in ensemble
    with pytest.raises(InvalidSpecError, match="prompts"):
        prompt_templates("single")


def test_template_lists_are_the_references_strings_in_their_order() -> None:
    """Every character counts (a missing period or article changes the text features)."""
    assert prompt_templates("ensemble") == CLIP_80
    assert prompt_templates("tip") == DMN_TIP_7 and sorted(DMN_TIP_7) == sorted(TIP_ADAPTER_7)
    assert prompt_templates("cars-dpe") == DPE_CARS


def test_the_order_of_the_tip_templates_changes_the_class_features_only_by_rounding() -> None:
    """TDA's and Tip-Adapter's order against ours (DMN's): the same mean up to float rounding."""
    raw = torch.randn(7, 6, 16, generator=torch.Generator().manual_seed(0))
    reordered = raw[[DMN_TIP_7.index(t) for t in TIP_ADAPTER_7]]
    torch.testing.assert_close(ensemble_text_features(reordered), ensemble_text_features(raw), atol=1e-6, rtol=0)


@pytest.mark.parametrize("prompt_set", ["tip", "ensemble"])
def test_class_features_match_clip_encode_text(clip: LoadedClip, prompt_set: str) -> None:
    """Truncated, batched encoding gives CLIP's padded-prompt ensemble within 1e-5."""
    method = get_method("zeroshot")
    tower = TextTower(clip.model, name=clip.name)
    ours = method.fixed_text_features(ZeroShotSpec(prompts=prompt_set), tower, clip.tokenizer, CLASS_NAMES)
    expected = clip_ensemble(clip, prompt_templates(prompt_set))
    assert ours is not None and ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-5)
    assert method.fixed_text_features(ZeroShotSpec(), tower, clip.tokenizer, CLASS_NAMES) is None


def test_ensemble_of_one_template_is_that_template() -> None:
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 5, 8, generator=g)
    assert torch.allclose(ensemble_text_features(raw), torch.nn.functional.normalize(raw[0], dim=-1))
    # Template norms do not weight the mean: scaling one template's features changes nothing.
    raw = torch.randn(3, 5, 8, generator=g)
    scaled = raw.clone()
    scaled[1] *= 7.0
    assert torch.allclose(ensemble_text_features(raw), ensemble_text_features(scaled), atol=1e-6)
    assert template_texts(["great_white_shark", "cat"], ["a {}.", "the {}!"]) == [
        "a great white shark.", "a cat.", "the great white shark!", "the cat!"]


def test_zeroshot_with_the_ensemble_predicts_from_its_class_features(clip: LoadedClip) -> None:
    tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from("zeroshot", {"prompts": "ensemble"}))
    image = random_image(3)
    result = tuner.run(image, seed=0, sample_key=0)
    views = tuner.make_views(image, seed=0, sample_key=0)
    logits = tuner.logit_scale * tuner.encode_images(views.pixels[:1]) @ clip_ensemble(
        clip, prompt_templates("ensemble")).t()
    assert result.pred == int(logits[0].argmax())
    assert result.top5 == torch.topk(logits[0], k=5).indices.tolist()


def test_prompts_option_is_validated_and_kept_out_of_default_fingerprints() -> None:
    for method in ("zeroshot", "zero", "mta"):
        with pytest.raises(InvalidSpecError, match="prompts"):
            method_spec_from(method, {"prompts": "poetry"})
    assert "prompts" not in ZeroShotSpec().to_dict()
    spec = ZeroShotSpec(prompts="tip")
    assert spec.to_dict()["prompts"] == "tip" and method_spec_from_dict(spec.to_dict()) == spec
    assert method_spec_from_dict(ZeroShotSpec().to_dict()) == ZeroShotSpec()
    assert ZeroSpec(prompts="ensemble").prompts == "ensemble" and MTASpec(prompts="tip").prompts == "tip"


def test_engine_runs_zero_and_mta_on_the_ensemble_features(clip: LoadedClip) -> None:
    """Through the engine: the prediction and per-view scores of the pure functions on the ensemble features."""
    image = random_image(5)
    text = clip_ensemble(clip, prompt_templates("tip"))
    for method in ("zero", "mta"):
        tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from(method, {"n_views": 8, "prompts": "tip"}))
        result = tuner.run(image, seed=0, sample_key=1)
        features = tuner.encode_images(tuner.make_views(image, seed=0, sample_key=1).pixels)
        if method == "zero":
            expected = zero_predict(features, text, tuner.logit_scale)
            assert result.pred == expected.pred
            assert [v.kept for v in result.views] == expected.kept.tolist() and result.n_kept == 2
        else:
            expected_mta = mta_predict(features, text, tuner.logit_scale)
            assert result.pred == int(expected_mta.logits.argmax())
            weights = [v.weight for v in result.views]
            assert all(w is not None for w in weights) and all(v.kept for v in result.views)
            assert weights == pytest.approx(expected_mta.inlierness.tolist(), abs=1e-5)
