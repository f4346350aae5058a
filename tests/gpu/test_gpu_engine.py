"""CUDA tier: the engine's fp16 frozen weights, autocast and GradScaler agree with the naive formulation.

Skipped without CUDA (tests/conftest.py). Run on a GPU machine with `python -m pytest -m gpu`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from difftpt_ops.core.specs import ModelSpec, method_spec_from
from difftpt_ops.models.clip import load_clip
from difftpt_ops.models.tiny_clip import make_tiny_clip
from difftpt_ops.tta import prepare_classifier
from difftpt_ops.tta.naive import NaiveTuner
from tests.unit.tta_support import CLASS_NAMES, random_image

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("method", "overrides"), [
    ("tpt", {"n_views": 16, "selection_p": 0.25}),
    ("difftpt", {"n_conventional": 8, "n_generated": 4, "steps": 2}),
])
def test_fast_equals_naive_on_cuda(tmp_path: Path, method: str, overrides: dict[str, object]) -> None:
    """On CUDA with precision auto (fp16 frozen weights, fp32 prompt): same predictions as the naive way."""
    clip = load_clip(ModelSpec(name=str(make_tiny_clip(tmp_path / "clip")), pretrained=None), device="cuda")
    assert clip.device.type == "cuda" and clip.precision == "fp16"
    spec = method_spec_from(method, overrides)
    generated = [random_image(10 + i) for i in range(4)]
    image = random_image(3)
    fast = prepare_classifier(clip, CLASS_NAMES, spec).run(image, generated=generated, seed=5, sample_key="x")
    naive = NaiveTuner(clip, CLASS_NAMES, spec).run(image, generated=generated, seed=5, sample_key="x")
    assert (fast.pred, fast.zeroshot_pred) == (naive.pred, naive.zeroshot_pred)
    assert fast.top5 == naive.top5
