"""The naive formulation starts every sample from the initial prompt, also when one tuner serves many samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.tta.naive import NaiveTuner
from tests.unit.tta_support import CLASS_NAMES, random_image, tiny_clip

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


def test_reused_naive_tuner_equals_fresh_ones(tmp_path: Path) -> None:
    """On the CPU the reset value once shared memory with the tuned context, so sample 2 saw sample 1's prompt."""
    clip = tiny_clip(tmp_path / "clip")
    spec = method_spec_from("tpt", {"n_views": 16, "selection_p": 0.25})
    reused = NaiveTuner(clip, CLASS_NAMES, spec)
    initial = reused.ctx_init.clone()
    for sample in range(3):
        image = random_image(sample)
        again = reused.run(image, seed=5, sample_key=sample)
        fresh = NaiveTuner(clip, CLASS_NAMES, spec).run(image, seed=5, sample_key=sample)
        assert (again.pred, again.top5, again.selected) == (fresh.pred, fresh.top5, fresh.selected)
        assert again.logits is not None and fresh.logits is not None
        assert (again.logits - fresh.logits).abs().max() < 1e-5
    assert bool((reused.ctx_init == initial).all())
