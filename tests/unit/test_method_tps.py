"""TPS against a straightforward transcription of the reference's per-sample procedure (elaine-sui/TPS,
shift_classification.py with model/learnable_shift.py and model/shifter.py): fp64, a loop over classes for the
prototypes, a loop over views for the logits, a sort for the confidence selection and AdamW written out by
hand; on random features and through the engine on the tiny CLIP, whose views it encodes one at a time."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InputError  # noqa: E402
from difftpt_ops.core.method_specs import TPTSpec, method_spec_from, method_spec_from_dict  # noqa: E402
from difftpt_ops.models.clip import LoadedClip  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.methods import FORWARD_ONLY, StepInputs, get_method  # noqa: E402
from difftpt_ops.tta.methods.ensemble import prompt_templates  # noqa: E402
from difftpt_ops.tta.methods.tps import TPSSpec, tps_adapt, tps_loss  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, random_image, tiny_clip  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

F64 = torch.float64
KEY = "sha256:" + "cd" * 32
DESCRIPTIONS = {name.replace("_", " "): [f"{name.replace('_', ' ')}, which has fins.",
                                         f"{name.replace('_', ' ')}, which is often seen in water."][:1 + i % 2]
                for i, name in enumerate(CLASS_NAMES)}


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def reference_loss(logits: torch.Tensor, p: float) -> tuple[torch.Tensor, list[int]]:
    """run_utils.select_confident_samples + avg_entropy: sort the views by entropy, keep int(n * p), then the
    entropy of their mean probability."""
    n = logits.shape[0]
    entropies = []
    for v in range(n):
        probs = torch.softmax(logits[v], dim=0)
        entropies.append(float(-(probs * torch.log(probs)).sum().detach()))
    kept = sorted(range(n), key=lambda v: entropies[v])[:int(n * p)]
    mean = sum(torch.softmax(logits[v], dim=0) for v in kept) / len(kept)
    return -(mean * torch.log(mean)).sum(), kept


def reference_tps(image: torch.Tensor, text: torch.Tensor, scale: float, *, p: float, steps: int, lr: float,
                  wd: float = 0.01, per_class: bool = True) -> tuple[torch.Tensor, list[int]]:
    """One sample as the reference runs it: a zero shift (per class or shared), `steps` AdamW steps on the
    loss of the confident views (re-selected each step), then view 0 against the shifted prototypes."""
    image, text = image.to(F64), text.to(F64)
    n_classes, dim = text.shape
    shift = torch.zeros((n_classes, dim) if per_class else (dim,), dtype=F64)
    m, v = torch.zeros_like(shift), torch.zeros_like(shift)
    first: list[int] = []

    def logits_of(s: torch.Tensor, views: range) -> torch.Tensor:
        rows = []
        for c in range(n_classes):  # get_text_features normalises, the shifter adds, forward normalises again
            rows.append(unit(unit(text[c]) + (s[c] if per_class else s)))
        protos = torch.stack(rows)
        return torch.stack([scale * (protos @ image[i]) for i in views])

    for t in range(1, steps + 1):
        s = shift.clone().requires_grad_(True)
        loss, kept = reference_loss(logits_of(s, range(image.shape[0])), p)
        first = first or kept
        (g,) = torch.autograd.grad(loss, s)
        shift = shift * (1 - lr * wd)  # AdamW: decoupled weight decay first
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        shift = shift - lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
    return logits_of(shift, range(1))[0], first


def _features(seed: int, n: int, c: int, d: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(c, d, generator=g, dtype=F64), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=-1)
    return image, text


# lr 0.2 over 6 steps moves the prototypes far enough that the confident views change between steps.
@pytest.mark.parametrize(("steps", "per_class", "lr"), [(1, True, 5e-3), (3, True, 5e-3), (2, False, 5e-3),
                                                        (6, True, 0.2)])
def test_matches_the_reference_transcription(steps: int, per_class: bool, lr: float) -> None:
    for seed in range(3):
        image, text = _features(seed, 20, 9)
        expected, kept = reference_tps(image, text, 10.0, p=0.25, steps=steps, lr=lr, per_class=per_class)
        out = tps_adapt(image, text, 10.0, selection_p=0.25, steps=steps, lr=lr, per_class=per_class)
        assert out.logits.dtype == F64
        assert out.indices.tolist() == kept
        assert torch.allclose(out.logits, expected, rtol=0, atol=1e-10)
        assert not torch.allclose(out.logits, 10.0 * text @ image[0], atol=1e-3)  # the shift moved something


def test_loss_is_the_entropy_of_the_mean_probability_of_the_confident_views() -> None:
    """At a non-zero shift: prototypes normalised, shifted, normalised again; plain floats throughout."""
    image, text = _features(7, 10, 5, d=6)
    shift = 0.3 * torch.randn(5, 6, generator=torch.Generator().manual_seed(8), dtype=F64)
    protos = [[x / math.sqrt(sum(y * y for y in row)) for x in row]
              for row in (text / text.norm(dim=-1, keepdim=True) + shift).tolist()]
    logits = [[4.0 * sum(a * b for a, b in zip(view, proto)) for proto in protos] for view in image.tolist()]

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(x - max(row)) for x in row]
        return [x / sum(e) for x in e]

    entropy = [-sum(q * math.log(q) for q in softmax(row)) for row in logits]
    kept = sorted(range(10), key=lambda i: entropy[i])[:3]
    mean = [sum(softmax(logits[i])[c] for i in kept) / 3 for c in range(5)]
    loss, indices = tps_loss(image, text, shift, torch.tensor(4.0, dtype=F64), 0.3)
    assert sorted(indices.tolist()) == sorted(kept)
    assert float(loss) == pytest.approx(-sum(q * math.log(q) for q in mean), rel=1e-12)


def test_a_selection_the_reference_leaves_empty_keeps_the_lowest_entropy_view() -> None:
    """int(5 * 0.1) = 0: the reference's mean over no view is NaN (documented); here the single most confident view
    is kept, which is the transcription with one view kept."""
    image, text = _features(11, 5, 9)
    out = tps_adapt(image, text, 10.0, selection_p=0.1, steps=1)
    expected, kept = reference_tps(image, text, 10.0, p=0.2, steps=1, lr=5e-3)  # int(5 * 0.2) = 1
    assert out.indices.tolist() == kept and len(kept) == 1
    assert torch.allclose(out.logits, expected, rtol=0, atol=1e-10)


def test_each_sample_starts_from_a_zero_shift() -> None:
    """The same sample gives the same result whatever ran before it (the reference's model.reset and its
    reloaded optimiser state)."""
    method, spec = get_method("tps"), TPSSpec(n_views=20, selection_p=0.25, steps=2)
    samples = [_features(seed, 20, 9) for seed in range(3)]

    def step(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image, text = image.float(), text.float()
        inputs = StepInputs(image_features=image, text_features=text, logit_scale=torch.tensor(10.0),
                            logits=10.0 * image @ text.t(), kinds=("original",) + ("conventional",) * 19)
        with torch.no_grad():  # as the engine calls it
            return method.step(spec, inputs).logits

    forward = [step(*s) for s in samples]
    backward = [step(*s) for s in reversed(samples)][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert torch.equal(a, b)


def test_defaults_and_views_are_the_references_and_tpts() -> None:
    method = get_method("tps")
    spec = TPSSpec()
    assert method.kind == FORWARD_ONLY
    assert (spec.n_views, spec.selection_p, spec.steps, spec.lr, spec.weight_decay, spec.per_class) == \
        (64, 0.1, 1, 5e-3, 0.01, True)
    assert (spec.prompts, spec.descriptions, spec.prompt.ctx_init) == ("single", None, "a photo of a")
    # TPT's plan, so that TPT's stored view features serve TPS.
    assert method.views(spec) == get_method("tpt").views(TPTSpec())
    assert "descriptions" not in spec.to_dict()
    assert method_spec_from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(("field", "value"), [("n_views", "0"), ("selection_p", "0"), ("selection_p", "1.5"),
                                              ("steps", "-1"), ("lr", "0"), ("weight_decay", "-1"),
                                              ("pooling", "mean"), ("prompts", "nope"), ("descriptions", " ")])
def test_bad_settings_name_the_field(field: str, value: str) -> None:
    with pytest.raises(InputError, match=field):
        method_spec_from("tps", {field: value})


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


def _encode_texts(clip: LoadedClip, texts: list[str]) -> torch.Tensor:
    """CLIP's own encode_text on padded 77-token prompts, each feature normalised, fp64."""
    with torch.no_grad():
        features = clip.model.encode_text(clip.tokenizer(texts)).to(F64)
    return features / features.norm(dim=-1, keepdim=True)


def _reference_run(clip: LoadedClip, spec: TPSSpec, text: torch.Tensor, image: object, seed: int) -> tuple:
    """The engine's views (same seed and key), each encoded on its own, then the reference transcription."""
    tuner = prepare_classifier(clip, CLASS_NAMES, spec, descriptions=DESCRIPTIONS if spec.descriptions else None)
    views = tuner.make_views(image, seed=seed, sample_key=seed)
    with torch.no_grad():
        rows = [clip.model.encode_image(views.pixels[i:i + 1])[0].to(F64) for i in range(len(views.kinds))]
    features = torch.stack([unit(row) for row in rows])
    scale = float(clip.model.logit_scale.exp())
    return reference_tps(features, text, scale, p=spec.selection_p, steps=spec.steps, lr=spec.lr,
                         per_class=spec.per_class)


def _engine_matches(clip: LoadedClip, spec: TPSSpec, text: torch.Tensor) -> None:
    tuner = prepare_classifier(clip, CLASS_NAMES, spec, descriptions=DESCRIPTIONS if spec.descriptions else None)
    for seed in range(3):
        image = random_image(30 + seed)
        fast = tuner.run(image, seed=seed, sample_key=seed)
        expected, kept = _reference_run(clip, spec, text, image, seed)
        assert fast.logits is not None
        assert sorted(v.index for v in fast.views if v.kept) == sorted(kept)
        # Logits are ~40 at scale 100 and one step moves them by ~0.1-1; fp32 batched features against fp64
        # per-view ones differ by ~1e-5, which Adam's sign-like first step can carry to ~4e-4.
        torch.testing.assert_close(fast.logits.to(F64), expected, atol=1e-3, rtol=0)
        assert fast.pred == int(expected.argmax())


@pytest.mark.parametrize("settings", [{}, {"steps": "3"}, {"per_class": "false", "steps": "2"}])
def test_engine_equals_the_reference_on_the_tiny_clip(clip: LoadedClip, settings: dict) -> None:
    """"a photo of a {class}." prototypes; the engine reads its fp32 features of all views batched."""
    spec = method_spec_from("tps", {"n_views": "16", "selection_p": "0.25", **settings})
    names = [name.replace("_", " ") for name in CLASS_NAMES]
    _engine_matches(clip, spec, _encode_texts(clip, [f"a photo of a {name}." for name in names]))


def _class_mean(clip: LoadedClip, texts: list[list[str]]) -> torch.Tensor:
    return torch.stack([_encode_texts(clip, own).mean(dim=0) for own in texts])


@pytest.mark.parametrize("pooling", ["micro", "macro", "descriptions"])
def test_initial_prototypes_from_templates_and_descriptions(clip: LoadedClip, pooling: str) -> None:
    """The reference README's example configuration (80 templates and GPT-4 descriptors, --with_templates
    --with_concepts): micro averages the two means, macro every text, descriptions takes them alone."""
    names = [name.replace("_", " ") for name in CLASS_NAMES]
    templates = [[t.format(name) for t in prompt_templates("ensemble")] for name in names]
    described = [DESCRIPTIONS[name] for name in names]
    if pooling == "micro":
        text = (_class_mean(clip, templates) + _class_mean(clip, described)) / 2
    elif pooling == "macro":
        text = _class_mean(clip, [a + b for a, b in zip(templates, described, strict=True)])
    else:
        text = _class_mean(clip, described)
    text = text / text.norm(dim=-1, keepdim=True)
    spec = method_spec_from("tps", {"n_views": "16", "selection_p": "0.25", "prompts": "ensemble",
                                    "descriptions": KEY, "pooling": pooling})
    tuner = prepare_classifier(clip, CLASS_NAMES, spec, descriptions=DESCRIPTIONS)
    torch.testing.assert_close(tuner._initial_text_features().to(F64), text, atol=1e-5, rtol=0)  # noqa: SLF001
    _engine_matches(clip, spec, text)
