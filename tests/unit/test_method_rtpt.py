"""R-TPT against a straightforward transcription of the reference's `rtpt.py` (loops over plain floats), its
settings, and the engine against the naive formulation on a tiny CLIP."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InvalidSpecError  # noqa: E402
from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.models.clip import LoadedClip  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.methods import StepInputs, get_method  # noqa: E402
from difftpt_ops.tta.methods.rtpt import (  # noqa: E402
    RTPTSpec,
    mean_view_entropy,
    reliability_weights,
    weighted_prediction,
)
from difftpt_ops.tta.naive import NaiveTuner  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, random_image, tiny_clip  # noqa: E402

pytestmark = pytest.mark.unit


def reference_weights(features: list[list[float]], k: int, temperature: float, exclude: str) -> list[float]:
    """`get_top_sim` and the softmax of rtpt.py, one view at a time: every similarity, the excluded ones set to
    -inf, sorted, the k largest averaged (k up to the number of views, as torch's topk allows); then exp(score / T)
    normalised. Every score -inf gives NaN weights, as the reference's softmax does."""
    n = len(features)
    assert k <= n  # topk raises above
    scores = []
    for i in range(n):
        row = []
        for j in range(n):
            s = sum(a * b for a, b in zip(features[i], features[j]))
            excluded = s >= 1.0 if exclude == "threshold" else i == j
            row.append(-math.inf if excluded else s)
        top = sorted(row, reverse=True)[:k]
        scores.append(sum(top) / k if all(v > -math.inf for v in top) else -math.inf)
    if all(s == -math.inf for s in scores):
        return [math.nan] * n
    peak = max(scores)
    e = [math.exp((s - peak) / temperature) for s in scores]
    return [v / sum(e) for v in e]


def _views(seed: int, n: int, dim: int = 12) -> torch.Tensor:
    """Normalised features scaled by 0.99 or 1.01 per row, so every similarity of a view with itself lies
    clearly below or above 1.0 and both formulations make the same threshold decisions."""
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.where(torch.rand(n, generator=g) < 0.5, 0.99, 1.01).to(torch.float64)
    return unit * scale.unsqueeze(1)


@pytest.mark.parametrize("exclude", ["threshold", "self"])
@pytest.mark.parametrize(("n", "k"), [(8, 3), (21, 20), (64, 20)])
def test_weights_match_the_reference_transcription(exclude: str, n: int, k: int) -> None:
    for seed in range(3):
        features = _views(seed, n)
        expected = reference_weights(features.tolist(), k, 0.01, exclude)
        got = reliability_weights(features, k, 0.01, exclude)
        assert got.dtype == torch.float64
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_the_threshold_rule_drops_every_similarity_at_or_above_one() -> None:
    """Two identical views above unit norm lose each other as well as themselves; "self" keeps them. With every
    view identical nothing is left: the views weigh equally (the reference's softmax would be NaN)."""
    features = _views(4, 10)
    features[3] = features[7] = 1.01 * torch.nn.functional.normalize(features[3], dim=0)
    for exclude in ("threshold", "self"):
        expected = reference_weights(features.tolist(), 8, 0.01, exclude)
        assert reliability_weights(features, 8, 0.01, exclude).tolist() == pytest.approx(expected, rel=1e-9)
    assert float(reliability_weights(features, 9, 0.01, "threshold")[3]) == 0.0  # only 8 similarities left
    same = 1.01 * torch.nn.functional.normalize(torch.ones(5, 4, dtype=torch.float64), dim=-1)
    assert all(math.isnan(w) for w in reference_weights(same.tolist(), 2, 0.01, "threshold"))
    assert reliability_weights(same, 2, 0.01, "threshold").tolist() == [0.2] * 5  # our documented fallback


@pytest.mark.parametrize("n", [8, 20])
def test_as_many_neighbours_as_views_is_the_references_topk_over_the_whole_row(n: int) -> None:
    """rtpt.py takes topk(20) of each row of the views' similarities: with exactly 20 views (`-b 20`) it runs,
    every similarity a view has left counts, and a view that lost one (its own under the threshold rule) gets
    -inf, weight 0. The spec accepts it; "self" leaves every view short of one, so the views weigh equally."""
    spec = method_spec_from("rtpt", {"n_views": str(n), "neighbours": str(n)})
    assert (spec.n_views, spec.neighbours) == (n, n)
    features = _views(5, n)
    expected = reference_weights(features.tolist(), n, 0.01, "threshold")
    got = reliability_weights(features, n, 0.01, "threshold")
    assert got.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0 < sum(w > 0 for w in expected) < n  # the views below 1.0 share the weight, the others get none
    assert reliability_weights(features, n, 0.01, "self").tolist() == pytest.approx([1.0 / n] * n)
    with pytest.raises(InvalidSpecError, match="neighbours"):
        method_spec_from("rtpt", {"n_views": str(n), "neighbours": str(n + 1)})  # topk raises above the row


def test_loss_is_the_mean_of_the_views_entropies() -> None:
    g = torch.Generator().manual_seed(1)
    logits = 30.0 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    expected = 0.0
    for row in logits.tolist():
        top = max(row)
        e = [math.exp(v - top) for v in row]
        expected -= sum(p * math.log(p) for p in (v / sum(e) for v in e) if p > 0) / len(logits)
    assert float(mean_view_entropy(logits)) == pytest.approx(expected, rel=1e-12)


def test_prediction_is_the_weighted_sum_of_the_views_logits() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    expected = [sum(weights[v].item() * logits[v, c].item() for v in range(5)) for c in range(7)]
    assert weighted_prediction(logits, weights).tolist() == pytest.approx(expected, rel=1e-12)


def test_registered_method_is_tpt_with_its_own_loss_weights_and_prediction() -> None:
    method = get_method("rtpt")
    g = torch.Generator().manual_seed(3)
    text = torch.nn.functional.normalize(torch.randn(9, 12, generator=g), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(30, 12, generator=g), dim=-1)
    logits = 100.0 * image @ text.t()
    inputs = StepInputs(image_features=image, text_features=text, logit_scale=torch.tensor(100.0), logits=logits,
                        kinds=("original",) + ("conventional",) * 29)
    spec = RTPTSpec(n_views=30, selection_p=0.2, neighbours=5)
    scores = method.select(spec, inputs)
    tpt = method_spec_from("tpt", {"n_views": 30, "selection_p": 0.2})
    assert scores.indices.tolist() == get_method("tpt").select(tpt, inputs).indices.tolist()
    assert scores.weight is not None and float(scores.weight.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(method.predict(spec, inputs), weighted_prediction(logits, scores.weight))
    assert float(method.loss(spec, logits[scores.indices], text)) == float(mean_view_entropy(logits[scores.indices]))
    assert method.prediction_views(spec) == 30
    plan = method.views(RTPTSpec())
    assert (plan.n_views, plan.augmix, plan.n_generated) == (64, None, 0)
    tuning = method.tuning(RTPTSpec())
    assert (tuning.steps, tuning.lr, tuning.weight_decay) == (1, 5e-3, 0.01)


@pytest.mark.parametrize(("field", "value"), [("neighbours", "65"), ("neighbours", "0"), ("temperature", "0"),
                                              ("exclude", "diagonal"), ("steps", "0"), ("selection_p", "0"),
                                              ("n_views", "1"), ("lr", "-1")])
def test_bad_settings_name_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidSpecError, match=field):
        method_spec_from("rtpt", {field: value})


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.mark.parametrize("exclude", ["threshold", "self"])
def test_engine_equals_the_reference_formulation(clip: LoadedClip, exclude: str) -> None:
    """Through the engine's speed-ups (image features once, truncated prompts) and the naive formulation
    (encoder re-run, full-length prompts, every view encoded again for the prediction) alike; the prediction is
    not view 0's tuned logits, and the stored per-view weights are the prediction's."""
    settings = {"n_views": "16", "selection_p": "0.25", "neighbours": "5", "exclude": exclude}
    spec = method_spec_from("rtpt", settings)
    for seed in range(3):
        image = random_image(20 + seed)
        fast = prepare_classifier(clip, CLASS_NAMES, spec).run(image, seed=seed, sample_key=seed)
        naive = NaiveTuner(clip, CLASS_NAMES, spec).run(image, seed=seed, sample_key=seed)
        assert (fast.pred, fast.top5, fast.zeroshot_pred) == (naive.pred, naive.top5, naive.zeroshot_pred)
        assert sorted(v.index for v in fast.views if v.kept) == sorted(naive.selected)
        assert fast.logits is not None and naive.logits is not None
        assert torch.allclose(fast.logits, naive.logits, atol=1e-4)
        assert sum(v.weight for v in fast.views) == pytest.approx(1.0, abs=1e-5)
