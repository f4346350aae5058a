"""View selection (TPT, DiffTPT chained and parallel) and the marginal-entropy loss."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from difftpt_ops.tta.losses import marginal_entropy, view_entropy  # noqa: E402
from difftpt_ops.tta.selection import cosine_to_original, select_difftpt, select_tpt  # noqa: E402

pytestmark = pytest.mark.unit


def _logits(n: int, classes: int = 10, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 20.0, n)[torch.randperm(n, generator=generator)]
    return torch.randn(n, classes, generator=generator) * scale[:, None]


def test_view_entropy_matches_definition() -> None:
    logits = _logits(5).double()
    p = logits.softmax(-1)
    assert torch.allclose(view_entropy(logits).double(), -(p * p.log()).sum(-1), atol=1e-6)


def test_tpt_keeps_the_lowest_entropy_views() -> None:
    """int(64 * 0.1) = 6 views, exactly the six smallest entropies, lowest first."""
    logits = _logits(64)
    selection = select_tpt(logits, 0.1)
    entropy = view_entropy(logits)
    assert selection.indices.tolist() == torch.argsort(entropy)[:6].tolist()
    assert entropy[selection.indices].max() <= entropy[torch.tensor(
        [i for i in range(64) if i not in selection.indices.tolist()])].min()
    assert torch.isnan(selection.cosine).all()


def test_tpt_keeps_at_least_one_view() -> None:
    assert select_tpt(_logits(3), 0.1).indices.numel() == 1


def test_loss_equals_direct_computation() -> None:
    """Entropy of the mean probability over views, computed directly in float64."""
    logits = _logits(6)
    mean = logits.double().softmax(-1).mean(0)
    assert math.isclose(float(marginal_entropy(logits)), float(-(mean * mean.log()).sum()), rel_tol=1e-5)


def test_loss_is_finite_for_extreme_logits() -> None:
    """A class with probability exp(-1e4) in every view must not make the loss NaN (the clamp)."""
    logits = torch.zeros(3, 4)
    logits[:, 0] = 1e4
    assert torch.isfinite(marginal_entropy(logits))


def test_vectorised_cosine_equals_the_loop() -> None:
    logits = _logits(20)
    loop = torch.stack([torch.nn.CosineSimilarity(dim=0)(logits[i], logits[0]) for i in range(1, 20)])
    vectorised = cosine_to_original(logits)
    assert torch.isnan(vectorised[0])
    assert torch.allclose(vectorised[1:], loop, atol=1e-6)


def test_difftpt_chained_counts_as_the_reference() -> None:
    """128 views: top int(127 * 0.8) = 101 by cosine, plus the original = 102, then int(102 * 0.3) = 30."""
    logits = _logits(128, classes=50)
    selection = select_difftpt(logits, logits, n_conventional=64, cosine_ratio=0.8, entropy_ratio=0.3)
    assert selection.indices.numel() == 30
    cosine = selection.cosine
    threshold = torch.sort(cosine[1:], descending=True).values[100]
    kept = selection.indices[selection.indices > 0]
    assert (cosine[kept] >= threshold).all()
    candidates = [0] + [i for i in range(1, 128) if cosine[i] >= threshold]
    entropy = selection.entropy
    assert selection.indices.tolist() == [candidates[j] for j in torch.argsort(entropy[candidates])[:30].tolist()]


def test_difftpt_cosine_on_features() -> None:
    """cosine_on="features" ranks by image-feature similarity, not logits."""
    logits = _logits(9)
    features = torch.randn(9, 4)
    selection = select_difftpt(logits, features, n_conventional=8, cosine_ratio=0.5, entropy_ratio=1.0,
                               cosine_on="features")
    expected = cosine_to_original(features)
    assert torch.allclose(selection.cosine[1:], expected[1:])
    top = (torch.argsort(expected[1:], descending=True)[:4] + 1).tolist()
    assert sorted(selection.indices.tolist()) == sorted([0] + top)


def test_difftpt_parallel_filters_each_kind_separately() -> None:
    """Original + conventional: entropy only; generated: cosine then entropy; the union is kept."""
    logits = _logits(1 + 8 + 10)
    selection = select_difftpt(logits, logits, n_conventional=8, cosine_ratio=0.5, entropy_ratio=0.5,
                               mode="parallel")
    entropy, cosine = selection.entropy, cosine_to_original(logits)
    conventional = torch.argsort(entropy[:9])[:4].tolist()
    similar = (torch.argsort(cosine[9:], descending=True)[:5] + 9)
    generated = similar[torch.argsort(entropy[similar])[:2]].tolist()
    assert selection.indices.tolist() == conventional + generated
    assert torch.isnan(selection.cosine[:9]).all() and not torch.isnan(selection.cosine[9:]).any()


def test_difftpt_without_generated_views() -> None:
    """Chained filters what exists; parallel reduces to entropy selection over the conventional views."""
    logits = _logits(1 + 8)
    chained = select_difftpt(logits, logits, n_conventional=8, cosine_ratio=0.8, entropy_ratio=0.3)
    assert chained.indices.numel() == int((1 + int(8 * 0.8)) * 0.3)
    parallel = select_difftpt(logits, logits, n_conventional=8, cosine_ratio=0.8, entropy_ratio=0.3, mode="parallel")
    assert parallel.indices.tolist() == select_tpt(logits, 0.3).indices.tolist()
    only_original = select_difftpt(logits[:1], logits[:1], n_conventional=0, cosine_ratio=0.8, entropy_ratio=0.3)
    assert only_original.indices.tolist() == [0]
