"""ZERO, MTA, C-TPT and the prompt-ensemble zero-shot through `submit tune` (embedded) on SQLite and
PostgreSQL: one prediction per sample, equal to the engine's own, and their per-view scores (kept, entropy,
MTA's inlierness as the weight) in view_scores."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.core.specs import ModelSpec
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Prediction, ViewScore
from difftpt_ops.models.clip import load_clip
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.running import contexts, runs
from difftpt_ops.tta import prepare_classifier
from tests.integration.test_jobs_support import add_dataset, make_settings, open_engine

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

N_SAMPLES = 3
N_VIEWS = 10
# Small but complete settings; kept views per sample follow from them.
CASES = {
    "zero": ({"n_views": str(N_VIEWS), "gamma": "0.3"}, int(N_VIEWS * 0.3)),
    "mta": ({"n_views": str(N_VIEWS), "prompts": "tip"}, N_VIEWS),
    "ctpt": ({"n_views": str(N_VIEWS), "selection_p": "0.2", "augmix": "false"}, int(N_VIEWS * 0.2)),
    "zeroshot": ({"prompts": "ensemble"}, 1),
}


def _images(root: Path) -> list[str]:
    relpaths = []
    for i in range(N_SAMPLES):
        relpath = f"class{i % 2}/{i}.png"
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        pixels = bytes((x * 7 + y * 3 + i * 50) % 256 for y in range(40) for x in range(56) for _ in range(3))
        Image.frombytes("RGB", (56, 40), pixels).save(root / relpath)
        relpaths.append(relpath)
    return relpaths


@pytest.mark.parametrize("method", list(CASES))
def test_method_runs_through_submit_tune(method: str, workspace: Path, database_url: str, tmp_path: Path,
                                         tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reporting, "report_progress", lambda *_: None)
    monkeypatch.setattr(reporting, "report_finished", lambda *_: None)
    monkeypatch.setattr(reporting, "_next_report", {})
    contexts.clear_caches()
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    relpaths = _images(root)
    add_dataset(engine, "pics", N_SAMPLES, root=root, classes=2, relpaths=relpaths)
    clip_dir = str(tiny_models_dir / "clip")
    overrides, n_kept = CASES[method]

    result = runs.submit_tune(engine, settings, dataset_ref="pics", method=method, model=clip_dir,
                              pretrained=None, overrides=dict(overrides))
    assert result.state == "finished"

    with session_scope(engine) as session:
        predictions = session.scalars(select(Prediction).where(Prediction.run_id == result.run_id)
                                      .order_by(Prediction.sample_id)).all()
        views = session.scalars(select(ViewScore).where(ViewScore.run_id == result.run_id)).all()
        stored = [(p.pred, p.n_views, p.n_kept) for p in predictions]
        encoded_or_read = [p.views_encoded + p.views_read for p in predictions]
        view_rows = [(v.sample_id, v.view_index, v.kept, v.entropy, v.weight) for v in views]
    n_views = 1 if method == "zeroshot" else N_VIEWS
    assert len(stored) == N_SAMPLES and len(view_rows) == N_SAMPLES * n_views
    assert all(row[1:] == (n_views, n_kept) for row in stored)
    assert all(count == n_views for count in encoded_or_read)
    for sample_id in {row[0] for row in view_rows}:
        rows = [row for row in view_rows if row[0] == sample_id]
        assert sum(row[2] for row in rows) == n_kept and all(row[3] is not None for row in rows)
        weights = [row[4] for row in rows]
        if method == "mta":  # the inlierness scores: a distribution over the sample's views
            assert all(w is not None and w > 0 for w in weights) and sum(weights) == pytest.approx(1.0, abs=1e-5)
        else:
            assert weights == [None] * len(rows)

    # The stored predictions are the engine's own on the same views (seed 0, keyed by content hash).
    clip = load_clip(ModelSpec(name=clip_dir, pretrained=None))
    tuner = prepare_classifier(clip, ["class0", "class1"], method_spec_from(method, dict(overrides)))
    expected = [tuner.run(Image.open(root / relpath), seed=0,
                          sample_key=hashlib.sha256(f"pics:{i}".encode()).hexdigest()).pred
                for i, relpath in enumerate(relpaths)]
    assert [row[0] for row in stored] == expected
