"""What the per-view feature store holds (entries, bytes, views; per dataset version) and how runs used
it (views encoded vs read from the store, per run)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Prediction, Run, Sample, ViewFeatures


def store_size(engine: Engine) -> dict[str, int]:
    """Entries and bytes held by the feature store (as its rows record them)."""
    with session_scope(engine) as session:
        entries, size, views = session.execute(select(
            func.count(), func.coalesce(func.sum(ViewFeatures.size_bytes), 0),
            func.coalesce(func.sum(ViewFeatures.n_views), 0))).one()
    return {"entries": int(entries), "bytes": int(size), "views": int(views)}


def view_counts(session: Session, run_ids: Sequence[int]) -> dict[int, dict[str, int | None]]:
    """Views encoded vs read from the store, per tuning run (summed over its predictions). None for the
    other kinds: a features run's work is the store itself (`data show`), a generation run encodes nothing."""
    if not run_ids:
        return {}
    kinds = dict(session.execute(select(Run.id, Run.kind).where(Run.id.in_(list(run_ids)))).all())
    counts: dict[int, dict[str, int | None]] = {
        run_id: ({"views_encoded": 0, "views_read": 0} if kinds.get(run_id) == "tune"
                 else {"views_encoded": None, "views_read": None}) for run_id in run_ids}
    rows = session.execute(select(Prediction.run_id, func.coalesce(func.sum(Prediction.views_encoded), 0),
                                  func.coalesce(func.sum(Prediction.views_read), 0))
                           .where(Prediction.run_id.in_(list(run_ids))).group_by(Prediction.run_id)).all()
    for run_id, encoded, read in rows:
        counts[run_id] = {"views_encoded": int(encoded), "views_read": int(read)}
    return counts


def dataset_store_size(session: Session, version_id: int) -> dict[str, int]:
    """Stored feature sets of a dataset version's samples (any model), with their bytes and views."""
    hashes = select(Sample.content_hash).where(Sample.dataset_version_id == version_id).scalar_subquery()
    entries, size, views = session.execute(select(
        func.count(), func.coalesce(func.sum(ViewFeatures.size_bytes), 0),
        func.coalesce(func.sum(ViewFeatures.n_views), 0)).where(ViewFeatures.sample_hash.in_(hashes))).one()
    return {"entries": int(entries), "bytes": int(size), "views": int(views)}


def run_feature_counts(engine: Engine, run_ids: Sequence[int]) -> dict[int, dict[str, int | None]]:
    """`view_counts` in a session of its own."""
    with session_scope(engine) as session:
        return view_counts(session, run_ids)
