"""Test-time prompt tuning of CLIP: zero-shot, TPT and DiffTPT. Pure torch; no paths, sessions or logging.

Public entry points: `prepare_classifier` builds a `Tuner` for one model, class list and method spec;
`Tuner.run` processes one sample and returns a `SampleResult`.
"""

from __future__ import annotations

from difftpt_ops.tta.engine import SampleResult, Tuner, ViewScore, prepare_classifier
from difftpt_ops.tta.views import ViewBatch

__all__ = ["SampleResult", "Tuner", "ViewBatch", "ViewScore", "prepare_classifier"]
