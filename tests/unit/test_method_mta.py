"""MTA against a straightforward formulation from the paper, edge cases and bad settings."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.core.errors import InvalidSpecError  # noqa: E402
from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.tta.methods import StepInputs, get_method  # noqa: E402
from difftpt_ops.tta.methods.mta import MTASpec, mta_predict  # noqa: E402

pytestmark = pytest.mark.unit

SCALE = 100.0


def _random(seed: int, n_views: int, n_classes: int, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Views scattered around one direction, as augmentations of one image are.
    center = torch.randn(dim, generator=g)
    image = torch.nn.functional.normalize(center + 0.6 * torch.randn(n_views, dim, generator=g), dim=-1)
    return image, torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)


def paper_mta(image: torch.Tensor, text: torch.Tensor, *, lambda_y: float = 0.2, lambda_q: float = 4.0,
              rounds: int = 5, tol: float = 1e-6) -> tuple[list[float], list[float]]:
    """The paper's alternating maximisation, element by element in float64: inlierness scores y (a softmax of
    kernel density plus lambda_q times the affinity-weighted scores, over lambda_y), then MeanShift steps
    of the mode weighted by y. Bandwidths from the k = int(0.3 (N - 1)) nearest neighbours; the mode starts
    at the original view. Returns (mode, y)."""
    x = image.double().tolist()
    n, d = len(x), len(x[0])
    t = text.double().tolist()

    def dist2(a: list[float], b: list[float]) -> float:
        return sum((u - v) ** 2 for u, v in zip(a, b, strict=True))

    k = int(0.3 * (n - 1))
    h2 = [0.5 * sum(sorted(dist2(x[i], x[j]) for j in range(n) if j != i)[:k]) / k for i in range(n)]
    probs = []
    for i in range(n):
        z = [SCALE * sum(x[i][m] * t[c][m] for m in range(d)) for c in range(len(t))]
        top = max(z)
        e = [math.exp(v - top) for v in z]
        probs.append([v / sum(e) for v in e])
    affinity = [[sum(a * b for a, b in zip(probs[i], probs[j], strict=True)) for j in range(n)] for i in range(n)]

    def kernel(mode: list[float]) -> list[float]:
        return [math.exp(-dist2(x[i], mode) / (2 * h2[i])) for i in range(n)]

    y = [1.0 / n] * n
    mode = list(x[0])
    for _ in range(rounds):
        density = kernel(mode)
        for _ in range(rounds):
            z = [(density[i] + lambda_q * sum(affinity[i][j] * y[j] for j in range(n))) / lambda_y for i in range(n)]
            top = max(z)
            e = [math.exp(v - top) for v in z]
            new = [v / sum(e) for v in e]
            moved = math.sqrt(sum((a - b) ** 2 for a, b in zip(new, y, strict=True)))
            y = new
            if moved < tol:
                break
        for _ in range(rounds):
            w = [a * b for a, b in zip(kernel(mode), y, strict=True)]
            new = [sum(w[i] * x[i][m] for i in range(n)) / sum(w) for m in range(d)]
            norm = math.sqrt(sum(v * v for v in new))
            new = [v / norm for v in new]
            moved = math.sqrt(sum((a - b) ** 2 for a, b in zip(new, mode, strict=True)))
            mode = new
            if moved < tol:
                break
    return mode, y


@pytest.mark.parametrize(("n_views", "n_classes"), [(64, 10), (16, 2), (8, 200)])
def test_matches_the_paper_formulation(n_views: int, n_classes: int) -> None:
    """Same prediction; mode and inlierness scores within 1e-5."""
    for seed in range(3):
        image, text = _random(seed, n_views, n_classes)
        mode, y = paper_mta(image, text)
        out = mta_predict(image, text, SCALE)
        expected = torch.tensor(mode, dtype=torch.float64) @ text.double().t()
        assert int(out.logits.argmax()) == int(expected.argmax())
        assert torch.allclose(out.mode.double(), torch.tensor(mode, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(out.inlierness.double(), torch.tensor(y, dtype=torch.float64), atol=1e-5)
        assert abs(float(out.inlierness.sum()) - 1.0) < 1e-5


def test_lambdas_change_the_scores() -> None:
    """The settings reach the computation: a much larger lambda_y flattens the inlierness towards uniform."""
    image, text = _random(7, 32, 10)
    sharp = mta_predict(image, text, SCALE).inlierness
    flat = mta_predict(image, text, SCALE, lambda_y=1e4).inlierness
    assert float(flat.std()) < float(sharp.std()) / 10
    assert not torch.allclose(mta_predict(image, text, SCALE, lambda_q=0.0).inlierness, sharp, atol=1e-4)


def test_one_view_is_its_own_mode() -> None:
    image, text = _random(1, 1, 5)
    out = mta_predict(image, text, SCALE)
    assert torch.allclose(out.mode, image[0], atol=1e-6) and out.inlierness.tolist() == [1.0]
    assert int(out.logits.argmax()) == int((image @ text.t()).argmax())


def test_identical_views_and_few_views_stay_finite() -> None:
    """All views alike (zero bandwidth) and 3 views (the code's k would be 0) give finite results."""
    image, text = _random(2, 1, 4)
    out = mta_predict(image.expand(6, -1).clone(), text, SCALE)
    assert torch.isfinite(out.logits).all() and torch.allclose(out.mode, image[0], atol=1e-6)
    out = mta_predict(*_random(4, 3, 2), SCALE)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.inlierness).all()


def test_step_stores_inlierness_as_weights() -> None:
    image, text = _random(9, 12, 6)
    inputs = StepInputs(image_features=image, text_features=text, logit_scale=torch.tensor(SCALE),
                        logits=SCALE * image @ text.t(), kinds=("original",) + ("conventional",) * 11)
    output = get_method("mta").step(MTASpec(n_views=12), inputs)
    direct = mta_predict(image, text, SCALE)
    assert torch.allclose(output.logits, direct.logits)
    assert output.scores.indices.tolist() == list(range(12))
    assert output.scores.weight is not None and torch.allclose(output.scores.weight, direct.inlierness)
    plan = get_method("mta").views(MTASpec())
    assert plan.n_views == 64 and plan.augmix is False


@pytest.mark.parametrize(("field", "value"), [("lambda_y", "0"), ("lambda_y", "-1"), ("lambda_q", "-0.5"),
                                              ("knn_ratio", "0"), ("knn_ratio", "1.2"), ("max_iter", "0"),
                                              ("prompts", "many")])
def test_bad_settings_name_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidSpecError, match=field):
        method_spec_from("mta", {field: value})
