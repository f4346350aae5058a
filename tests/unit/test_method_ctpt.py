"""C-TPT's loss against a straightforward formulation from the paper, its gradient, selection and settings."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InvalidSpecError  # noqa: E402
from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.models.clip import LoadedClip  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.losses import marginal_entropy  # noqa: E402
from difftpt_ops.tta.methods import StepInputs, get_method  # noqa: E402
from difftpt_ops.tta.methods.ctpt import CTPTSpec, ctpt_loss, text_feature_dispersion  # noqa: E402
from difftpt_ops.tta.naive import NaiveTuner  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, random_image, tiny_clip  # noqa: E402

pytestmark = pytest.mark.unit


def _features(seed: int, n: int, dim: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)


def paper_atfd(text: torch.Tensor) -> float:
    """Average Text Feature Dispersion: mean over classes of ||t_c - centroid||_2."""
    t = text.double().tolist()
    c, d = len(t), len(t[0])
    centroid = [sum(t[i][m] for i in range(c)) / c for m in range(d)]
    return sum(math.sqrt(sum((t[i][m] - centroid[m]) ** 2 for m in range(d))) for i in range(c)) / c


def paper_loss(logits: torch.Tensor, text: torch.Tensor, lam: float) -> float:
    """TPT's entropy of the averaged probabilities minus lambda times the ATFD."""
    rows = logits.double().tolist()
    probs = []
    for row in rows:
        top = max(row)
        e = [math.exp(v - top) for v in row]
        probs.append([v / sum(e) for v in e])
    mean = [sum(p[j] for p in probs) / len(probs) for j in range(len(rows[0]))]
    return -sum(p * math.log(p) for p in mean if p > 0) - lam * paper_atfd(text)


@pytest.mark.parametrize("n_classes", [2, 10, 200])
def test_loss_matches_the_paper_formulation(n_classes: int) -> None:
    for seed in range(4):
        text = _features(seed, n_classes)
        logits = 100.0 * _features(seed + 50, 6) @ text.t()
        assert abs(float(text_feature_dispersion(text)) - paper_atfd(text)) < 1e-5
        assert abs(float(ctpt_loss(logits, text, 20.0)) - paper_loss(logits, text, 20.0)) < 1e-5


def test_lambda_zero_is_tpt_and_identical_classes_have_no_dispersion() -> None:
    text = _features(1, 7)
    logits = 100.0 * _features(2, 6) @ text.t()
    assert float(ctpt_loss(logits, text, 0.0)) == float(marginal_entropy(logits))
    same = text[:1].expand(5, -1)
    assert float(text_feature_dispersion(same)) < 1e-6


def test_gradient_spreads_the_class_features() -> None:
    """A descent step on C-TPT's loss increases the dispersion more than the same step on TPT's."""
    base = _features(3, 8)
    image = _features(4, 6)

    def atfd_after_step(lam: float) -> float:
        text = base.clone().requires_grad_(True)
        loss = ctpt_loss(100.0 * image @ torch.nn.functional.normalize(text, dim=-1).t(), text, lam)
        loss.backward()
        assert text.grad is not None
        moved = torch.nn.functional.normalize(text.detach() - 1e-2 * text.grad, dim=-1)
        return float(text_feature_dispersion(moved))

    assert atfd_after_step(50.0) > atfd_after_step(0.0)


def test_registered_method_uses_tpt_selection_and_the_reference_views() -> None:
    method = get_method("ctpt")
    text = _features(5, 9)
    image = _features(6, 20)
    logits = 100.0 * image @ text.t()
    inputs = StepInputs(image_features=image, text_features=text, logit_scale=torch.tensor(100.0), logits=logits,
                        kinds=("original",) + ("conventional",) * 19)
    spec = CTPTSpec(n_views=20, selection_p=0.25)
    kept = method.select(spec, inputs).indices
    assert kept.tolist() == get_method("tpt").select(method_spec_from("tpt", {"n_views": 20, "selection_p": 0.25}),
                                                     inputs).indices.tolist()
    assert float(method.loss(spec, logits[kept], text)) == pytest.approx(float(ctpt_loss(logits[kept], text, 20.0)))
    plan = method.views(CTPTSpec())
    assert plan.n_views == 64 and plan.augmix is True
    assert method.tuning(CTPTSpec()).steps == 1 and method.tuning(CTPTSpec()).lr == 5e-3


@pytest.mark.parametrize(("field", "value"), [("lambda_term", "-1"), ("selection_p", "0"),
                                              ("selection_p", "1.5"), ("lr", "0"), ("steps", "-1")])
def test_bad_settings_name_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidSpecError, match=field):
        method_spec_from("ctpt", {field: value})


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


def test_engine_equals_the_reference_formulation_and_lambda_reaches_the_tuning(clip: LoadedClip) -> None:
    """Through the engine's exact speed-ups and the naive formulation alike; the dispersion term changes the
    tuned prompt (a large lambda moves the prediction's logits away from plain TPT's)."""
    image = random_image(11)
    settings = {"n_views": "16", "selection_p": "0.25", "augmix": "false", "lambda_term": "50"}
    spec = method_spec_from("ctpt", settings)
    fast = prepare_classifier(clip, CLASS_NAMES, spec).run(image, seed=0, sample_key=7)
    naive = NaiveTuner(clip, CLASS_NAMES, spec).run(image, seed=0, sample_key=7)
    assert (fast.pred, fast.top5, fast.zeroshot_pred) == (naive.pred, naive.top5, naive.zeroshot_pred)
    assert sorted(v.index for v in fast.views if v.kept) == sorted(naive.selected)
    plain = prepare_classifier(clip, CLASS_NAMES, method_spec_from("ctpt", {**settings, "lambda_term": "0"}))
    tpt = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", {"n_views": "16", "selection_p": "0.25"}))
    without = plain.run(image, seed=0, sample_key=7)
    assert without.entropy_after == pytest.approx(tpt.run(image, seed=0, sample_key=7).entropy_after, abs=1e-6)
    assert abs(fast.entropy_after - without.entropy_after) > 1e-6


def test_lambda_follows_the_reference_scripts_per_dataset_unless_set() -> None:
    """Unset, lambda is resolved at submit as the reference's two scripts do: 50 on the fine-grained
    (cross-domain) sets, 20 on ImageNet and its shifts; a value the user sets is kept."""
    from difftpt_ops.core.method_specs import resolve_for_dataset
    from difftpt_ops.data.formats import CROSS_DOMAIN_FORMATS

    spec = method_spec_from("ctpt")
    assert spec.lambda_term is None
    assert {resolve_for_dataset(spec, fmt).lambda_term for fmt in CROSS_DOMAIN_FORMATS} == {50.0}
    assert {resolve_for_dataset(spec, fmt).lambda_term for fmt in ("imagenet", "imagenet-r", "imagefolder")} == {20.0}
    assert resolve_for_dataset(method_spec_from("ctpt", {"lambda_term": "7"}), "dtd").lambda_term == 7.0
    fine, natural = resolve_for_dataset(spec, "dtd"), resolve_for_dataset(spec, "imagenet")
    assert fine.to_dict() != natural.to_dict()  # so the two settings are two runs
