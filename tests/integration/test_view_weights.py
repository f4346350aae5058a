"""A method's own per-view weight (MTA's inlierness) lands in view_scores.weight; methods without one store NULL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import ViewScore
from difftpt_ops.services.running import runs
from tests.integration.test_jobs_support import (
    add_dataset,
    make_settings,
    open_engine,
    quiet_run_machinery,
    write_pngs,
)

pytestmark = pytest.mark.integration


def test_mta_inlierness_is_stored_per_view(database_url: str, workspace: Path, tmp_path: Path,
                                           tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_run_machinery(monkeypatch)
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 2, root=root, classes=2, relpaths=write_pngs(root, 2))
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
