"""A method's own per-view weight (MTA's inlierness) lands in view_scores.weight; methods without one store NULL."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import ViewScore
from difftpt_ops.services import reporting, runs, shards, tuning
from tests.integration.test_jobs_support import add_dataset, make_settings, open_engine

pytestmark = pytest.mark.integration


def _images(root: Path, n: int) -> list[str]:
    relpaths = []
    for i in range(n):
        relpath = f"class{i % 2}/{i}.png"
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), ((i * 60) % 256, 90, (i * 20) % 256)).save(root / relpath)
        relpaths.append(relpath)
    return relpaths


def test_mta_inlierness_is_stored_per_view(database_url: str, workspace: Path, tmp_path: Path,
                                           tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reporting, "report_progress", lambda *_: None)
    monkeypatch.setattr(reporting, "report_finished", lambda *_: None)
    monkeypatch.setattr(shards, "_next_report", {})
    tuning.clear_caches()
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 2, root=root, classes=2, relpaths=_images(root, 2))
    clip = str(tiny_models_dir / "clip")
    mta = runs.submit_tune(engine, settings, dataset_ref="pics", method="mta", model=clip, pretrained=None,
                           overrides={"n_views": "6"})
    tpt = runs.submit_tune(engine, settings, dataset_ref="pics", method="tpt", model=clip, pretrained=None,
                           overrides={"n_views": "6"})
    with session_scope(engine) as session:
        weights = session.scalars(select(ViewScore.weight).where(ViewScore.run_id == mta.run_id)).all()
        tpt_weights = session.scalars(select(ViewScore.weight).where(ViewScore.run_id == tpt.run_id)).all()
    assert len(weights) == 12 and all(w is not None and 0.0 <= w <= 1.0 + 1e-6 for w in weights)
    assert len(tpt_weights) == 12 and all(w is None for w in tpt_weights)
