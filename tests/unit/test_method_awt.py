"""AWT (zero-shot) against a plain transcription of the reference's evaluate.py, through the engine, and its
refusals.

The oracle (`reference_awt`) follows MCG-NJU/AWT AWT_zero_shot/evaluate.py step by step on the reference's
layout: text features stacked class-major, (n_classes * n_prompts, d); logits reshaped to (views, prompts,
classes); the prompt weights from the anchor with one class's entry replaced (written as a loop here, a
scatter there); Sinkhorn from ones over (classes, views, prompts) kernels with the reference's stopping rule.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InputError, InvalidSpecError  # noqa: E402
from difftpt_ops.core.method_specs import method_spec_from, method_spec_from_dict  # noqa: E402
from difftpt_ops.models.clip import LoadedClip  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.methods import get_method, resolve_for_dataset  # noqa: E402
from difftpt_ops.tta.methods.awt import AWTSpec, awt_predict, awt_texts  # noqa: E402
from difftpt_ops.tta.naive import NaiveTuner  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, random_image, tiny_clip  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

KEY = "sha256:" + "cd" * 32
SCALE = 100.0
SENTENCES = ["with fins and scales.", "swimming in dark water.", "seen from above, on a plate."]
DESCRIPTIONS = {name.replace("_", " "): [f"A {name.replace('_', ' ')} {s}" for s in SENTENCES]
                for name in CLASS_NAMES}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def reference_awt(image: torch.Tensor, text_flat: torch.Tensor, logit_scale: float, n_prompt: int, *,
                  img_t: float = 0.5, text_t: float = 0.5) -> tuple[torch.Tensor, int]:
    """evaluate.py's AWT_evaluation loop body for one sample: (output_ot (n_classes,), Sinkhorn iterations)."""
    n_views = image.shape[0]
    scale = torch.tensor(logit_scale, dtype=image.dtype)
    output = scale * image @ text_flat.t()
    output = output.view(n_views, -1, n_prompt).permute(0, 2, 1).contiguous()  # views x prompts x classes
    # get_entropy_weight
    image_weights = torch.softmax(-entropy(output.mean(1)) / img_t, dim=-1)
    _, n_des, n_cls = output.shape
    anchor_row = output[0].mean(0)
    text_entropy = torch.empty(n_des, n_cls, dtype=image.dtype)
    for j in range(n_des):
        for c in range(n_cls):
            row = anchor_row.clone()
            row[c] = output[0, j, c]
            text_entropy[j, c] = entropy(row)
    text_weights = torch.softmax(-text_entropy.t() / text_t, dim=-1)  # classes x prompts
    # optimal_transport
    sim = (output / scale).permute(2, 0, 1)  # classes x views x prompts
    kernel = torch.exp(-(1.0 - sim) / 0.1)
    # Sinkhorn, as written there: r starts as ones_like(u), (views,), and broadcasts on the first comparison.
    r = torch.ones_like(image_weights)
    c = torch.ones_like(text_weights)
    iterations = 0
    for _ in range(100):
        iterations += 1
        r0 = r
        r = image_weights / torch.matmul(kernel, c.unsqueeze(-1)).squeeze(-1)
        c = text_weights / torch.matmul(kernel.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean().item() < 1e-2:
            break
    plan = torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * kernel
    plan = plan.permute(1, 2, 0)
    assert not torch.isnan(plan).any()
    return torch.sum(plan * output, dim=(0, 1)), iterations


def _features(seed: int, n_views: int, n_classes: int, n_prompts: int, dim: int = 12,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Views scattered around one image direction; per class, prompts scattered around a class direction that
    leans towards the image for the first classes (so entropies and plans vary)."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(dim, generator=g, dtype=torch.float64)
    image = torch.nn.functional.normalize(center + 0.7 * torch.randn(n_views, dim, generator=g, dtype=torch.float64),
                                          dim=-1)
    classes = torch.randn(n_classes, dim, generator=g, dtype=torch.float64)
    classes[: n_classes // 2] += 0.8 * center
    prompts = classes[:, None, :] + 0.5 * torch.randn(n_classes, n_prompts, dim, generator=g, dtype=torch.float64)
    return image.to(dtype), torch.nn.functional.normalize(prompts, dim=-1).to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("img_t", "text_t"), [(0.5, 0.5), (0.3, 0.9)])
def test_scores_equal_the_reference_transcription_fp32(seed: int, img_t: float, text_t: float) -> None:
    n_views, n_classes, n_prompts = 9, 6, 5
    image, prompts = _features(seed, n_views, n_classes, n_prompts)
    expected, iterations = reference_awt(image, prompts.reshape(-1, prompts.shape[-1]), SCALE, n_prompts,
                                         img_t=img_t, text_t=text_t)
    out = awt_predict(image, prompts, SCALE, image_temperature=img_t, text_temperature=text_t)
    assert out.iterations == iterations and iterations > 2  # Sinkhorn ran several rounds and stopped where it does
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, expected, rtol=1e-6, atol=1e-6)
    assert out.image_weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(out.text_weights.sum(-1), torch.ones(n_classes), atol=1e-6)


@pytest.mark.parametrize("seed", [3, 4])
def test_scores_equal_the_reference_transcription_fp64(seed: int) -> None:
    n_views, n_classes, n_prompts = 7, 5, 4
    image, prompts = _features(seed, n_views, n_classes, n_prompts, dtype=torch.float64)
    for img_t, text_t in ((0.5, 0.5), (0.25, 0.7)):
        expected, iterations = reference_awt(image, prompts.reshape(-1, prompts.shape[-1]), SCALE, n_prompts,
                                             img_t=img_t, text_t=text_t)
        out = awt_predict(image, prompts, SCALE, image_temperature=img_t, text_temperature=text_t)
        assert out.iterations == iterations
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("dim", "rounds"), [(2, 100), (3, 66)])
def test_sinkhorn_stops_at_its_cap_or_its_threshold(dim: int, rounds: int) -> None:
    """In 2 or 3 dimensions the cosines spread over [-1, 1], the kernel spans exp(-20)..1 and Sinkhorn converges
    slowly: the reference stops after 100 iterations whatever the change (dim 2), or once the mean change of r
    is below 1e-2 (dim 3, 66 iterations)."""
    image, prompts = _features(1, 6, 4, 3, dim=dim, dtype=torch.float64)
    expected, iterations = reference_awt(image, prompts.reshape(-1, prompts.shape[-1]), SCALE, 3)
    out = awt_predict(image, prompts, SCALE)
    assert out.iterations == iterations == rounds
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-10)


def test_single_view_and_single_prompt_are_valid() -> None:
    image, prompts = _features(6, 1, 3, 1, dtype=torch.float64)
    expected, _ = reference_awt(image, prompts.reshape(-1, prompts.shape[-1]), SCALE, 1)
    torch.testing.assert_close(awt_predict(image, prompts, SCALE).logits, expected, rtol=0, atol=1e-10)


def test_step_reads_the_prompt_sets_and_stores_the_view_weights() -> None:
    from difftpt_ops.tta.methods import StepInputs

    image, prompts = _features(7, 5, 4, 3)
    text = torch.nn.functional.normalize(prompts.mean(1), dim=-1)
    inputs = StepInputs(image_features=image, text_features=text, logit_scale=torch.tensor(SCALE),
                        logits=SCALE * image @ text.t(), kinds=("original",) + ("conventional",) * 4,
                        prompt_features=prompts)
    out = get_method("awt").step(AWTSpec(num_descriptor=2), inputs)
    expected, _ = reference_awt(image, prompts.reshape(-1, prompts.shape[-1]), SCALE, 3)
    torch.testing.assert_close(out.logits, expected, rtol=1e-6, atol=1e-6)
    assert out.scores.indices.tolist() == [0, 1, 2, 3, 4] and out.scores.weight is not None
    assert out.scores.weight.sum().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InvalidSpecError, match="prompt features"):
        get_method("awt").step(AWTSpec(), dataclasses.replace(inputs, prompt_features=None))


# ---- through the engine, on the tiny CLIP ----


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


def test_texts_are_the_reference_prompts() -> None:
    texts = awt_texts("a photo of a {}", ["great_white_shark"], [["Big.", "Grey.", "Unused."]], 2)
    assert texts == [["a photo of a great white shark.", "a photo of a great white shark. Big.",
                      "a photo of a great white shark. Grey."]]


def test_engine_equals_the_reference_on_clip_features(clip: LoadedClip) -> None:
    """The engine's prediction for a sample equals the oracle fed with CLIP's own features: encode_text on the
    padded prompts (template + '.', template + '. ' + description), encode_image on the same views."""
    spec = AWTSpec(n_views=6, num_descriptor=2, descriptions=KEY, template="a photo of the {}")
    tuner = prepare_classifier(clip, CLASS_NAMES, spec, descriptions=DESCRIPTIONS)
    views = tuner.make_views(random_image(0), seed=1, sample_key="s0")
    assert views.kinds == ("original",) + ("conventional",) * 5
    result = tuner.run_views(views)
    model = clip.model
    texts = [t for own in awt_texts("a photo of the {}", CLASS_NAMES,
                                    [DESCRIPTIONS[n.replace("_", " ")] for n in CLASS_NAMES], 2) for t in own]
    assert texts[:3] == ["a photo of the tench.", "a photo of the tench. A tench with fins and scales.",
                         "a photo of the tench. A tench swimming in dark water."]
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(clip.tokenizer(texts)).float(), dim=-1)
        image = torch.nn.functional.normalize(model.encode_image(views.pixels).float(), dim=-1)
    expected, _ = reference_awt(image, text, float(model.logit_scale.exp()), 3)
    assert result.logits is not None
    torch.testing.assert_close(result.logits, expected.float(), rtol=1e-4, atol=1e-4)
    assert result.pred == int(expected.argmax()) and result.n_kept == 6
    assert all(v.weight is not None for v in result.views)
    # The zero-shot "before" is view 0 against the normalised mean of each class's prompts.
    mean = torch.nn.functional.normalize(text.view(len(CLASS_NAMES), 3, -1).mean(1), dim=-1)
    assert result.zeroshot_pred == int((image[0] @ mean.t()).argmax())
    # The naive formulation (reference-style encoders) gives the same prediction.
    naive = NaiveTuner(clip, CLASS_NAMES, spec, descriptions=DESCRIPTIONS)
    again = naive.run(random_image(0), seed=1, sample_key="s0")
    assert again.pred == result.pred and again.logits is not None
    torch.testing.assert_close(again.logits, result.logits, rtol=1e-4, atol=1e-4)


def test_other_methods_see_no_prompt_sets(clip: LoadedClip) -> None:
    tuner = prepare_classifier(clip, CLASS_NAMES, method_spec_from("zeroshot", {"descriptions": KEY}),
                               descriptions=DESCRIPTIONS)
    assert tuner._prompt_sets is None and tuner._initial_text is not None and tuner._initial_text.ndim == 2


# ---- refusals and defaults ----


def test_the_engine_refuses_awt_without_descriptions_or_with_too_few(clip: LoadedClip) -> None:
    with pytest.raises(InvalidSpecError, match="--set descriptions"):
        prepare_classifier(clip, CLASS_NAMES, AWTSpec(n_views=2))
    with pytest.raises(InvalidSpecError, match="num_descriptor=50.*fewest 3"):
        prepare_classifier(clip, CLASS_NAMES, AWTSpec(n_views=2, descriptions=KEY), descriptions=DESCRIPTIONS)


def _write(path: Path, by_class: dict[str, list[str]]) -> str:
    path.write_text(json.dumps(by_class), encoding="utf-8")
    return str(path)


def test_submit_refuses_awt_without_a_descriptions_file(tmp_path: Path) -> None:
    from difftpt_ops.config import Settings
    from difftpt_ops.services.running.descriptions import resolve_descriptions

    settings = Settings(workspace=tmp_path)
    with pytest.raises(InputError) as info:
        resolve_descriptions(settings, method_spec_from("awt"), CLASS_NAMES)
    assert "\n" not in str(info.value) and "--set descriptions" in str(info.value)
    # Other methods still run without one.
    spec, data = resolve_descriptions(settings, method_spec_from("zero"), CLASS_NAMES)
    assert spec == method_spec_from("zero") and data is None


def test_submit_refuses_a_file_with_fewer_than_num_descriptor_sentences(tmp_path: Path) -> None:
    from difftpt_ops.config import Settings
    from difftpt_ops.services.running.descriptions import resolve_descriptions

    settings = Settings(workspace=tmp_path)
    path = _write(tmp_path / "d.json", DESCRIPTIONS)
    with pytest.raises(InputError) as info:
        resolve_descriptions(settings, method_spec_from("awt", {"descriptions": path}), CLASS_NAMES)
    message = str(info.value)
    assert "\n" not in message and "num_descriptor=50" in message and "'tench'" in message
    assert "--set num_descriptor=3" in message
    spec, data = resolve_descriptions(settings, method_spec_from("awt", {"descriptions": path,
                                                                         "num_descriptor": "3"}), CLASS_NAMES)
    assert spec.descriptions.startswith("sha256:") and data is not None  # type: ignore[attr-defined]


def test_defaults_and_per_dataset_templates() -> None:
    spec = method_spec_from("awt")
    assert isinstance(spec, AWTSpec)
    assert (spec.n_views, spec.num_descriptor, spec.image_temperature, spec.text_temperature, spec.augmix) == (
        51, 50, 0.5, 0.5, False)
    plan = get_method("awt").views(spec)
    assert (plan.n_views, plan.n_conventional, plan.augmix, plan.crop_scale) == (51, 50, False, (0.08, 1.0))
    assert get_method("awt").requires_descriptions
    dtd = "a photo of a {}, which is a type of texture, or a type of pattern"
    assert resolve_for_dataset(spec, "dtd").template == dtd
    assert resolve_for_dataset(spec, "imagenet-r").template == "a rendition photo of a {}"
    assert resolve_for_dataset(spec, "imagefolder").template == "a photo of a {}"
    resolved = resolve_for_dataset(spec, "pets")
    assert method_spec_from_dict(resolved.to_dict()) == resolved
    with pytest.raises(InvalidSpecError, match="template"):
        method_spec_from("awt", {"template": "no slot"})
    with pytest.raises(InvalidSpecError, match="num_descriptor"):
        method_spec_from("awt", {"num_descriptor": "-1"})


# MCG-NJU/AWT AWT_zero_shot/data/cls_to_names.py `CUSTOM_TEMPLATES` (no final period: evaluate.py appends "." or
# ". " + description), by the reference's dataset id, written out independently of the method module.
AWT_CUSTOM_TEMPLATES = {
    "oxford_pets": "a photo of a {} from OxfordPets", "oxford_flowers": "a photo of a {}, a type of flower",
    "fgvc_aircraft": "a photo of a {} from Fine-Grained Visual Classification of Aircraft",
    "dtd": "a photo of a {}, which is a type of texture, or a type of pattern",
    "eurosat": "satellite photo of the {}", "stanford_cars": "a photo of a {}",
    "food101": "a photo of a {} from Food101",
    "sun397": "a photo of a {}", "caltech101": "a photo of a {}", "ucf101": "a photo of a person doing {}",
    "imagenet": "a photo of a {}", "imagenet_sketch": "a sketch photo of a {}", "imagenetv2": "a photo of a {}",
    "imagenet_a": "a photo of a {}", "imagenet_r": "a rendition photo of a {}",
}
# This project's dataset formats -> the reference's ids (data/datautils.py ID_to_DIRNAME); an image folder has none.
AWT_IDS = {
    "imagenet": "imagenet", "imagenet-a": "imagenet_a", "imagenet-v2": "imagenetv2", "imagenet-r": "imagenet_r",
    "imagenet-sketch": "imagenet_sketch", "pets": "oxford_pets", "flower102": "oxford_flowers",
    "aircraft": "fgvc_aircraft", "dtd": "dtd", "eurosat": "eurosat", "cars": "stanford_cars", "food101": "food101",
    "sun397": "sun397", "caltech101": "caltech101", "ucf101": "ucf101",
}


def test_every_dataset_format_resolves_to_the_references_template() -> None:
    from difftpt_ops.data.formats import FORMATS

    assert set(FORMATS) == {*AWT_IDS, "imagefolder"}  # a new format must be mapped here
    spec = method_spec_from("awt")
    for dataset_format in FORMATS:
        expected = AWT_CUSTOM_TEMPLATES[AWT_IDS.get(dataset_format, "imagenet")]
        assert resolve_for_dataset(spec, dataset_format).template == expected, dataset_format


def test_the_demo_leaves_awt_out() -> None:
    from difftpt_ops.services.demo import episodic_methods

    assert "awt" not in episodic_methods() and "zero" in episodic_methods()


@pytest.mark.parametrize("template", ["{} and {}", "a {} in {style}", "a {} {0}", "a {}}"])
def test_a_template_str_format_cannot_fill_is_refused_at_submit(template: str) -> None:
    """QA: `--set template="{} and {}"` passed the "must contain '{}'" check, then every shard failed with
    "IndexError: Replacement index 1 out of range" (the prompts are `template.format(name)`, as the reference's)."""
    with pytest.raises(InvalidSpecError, match="no other braces") as raised:
        method_spec_from("awt", {"template": template})
    assert (raised.value.argument, raised.value.value) == ("--set template", template)
    literal = method_spec_from("awt", {"template": "a {} {{sic}}"})
    assert awt_texts(literal.template, ["cat"], [["tabby"]], 1) == [["a cat {sic}.", "a cat {sic}. tabby"]]
