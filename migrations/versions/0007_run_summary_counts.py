"""run_summary: done / failed / pending of generation runs from their shards

Tuning runs count their predictions and sample errors, as before. Generation runs have neither: the view
showed a finished generation run as 0 done and every sample pending, while `runs list` (which reads the
shards' counters) showed it done. They now read the same counters. Columns and their order are unchanged.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None



def _load_0003():  # type: ignore[no-untyped-def]
    """The 0003 migration module, loaded from its file (version files are not an importable package)."""
    spec = importlib.util.spec_from_file_location("_difftpt_migration_0003", Path(__file__).with_name("0003_trust.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The view as 0003 defined it (the downgrade restores it); its helper for the accuracy ratios is reused.
_trust = _load_0003()


def run_summary() -> str:
    ratio = _trust._ratio
    done = "CASE WHEN r.kind = 'tune' THEN COALESCE(p.done, 0) ELSE COALESCE(s.done, 0) END"
    failed = "CASE WHEN r.kind = 'tune' THEN COALESCE(e.failed, 0) ELSE COALESCE(s.failed, 0) END"
    return f"""
CREATE VIEW run_summary AS
SELECT r.id AS run_id, r.kind, r.method, r.state, d.name AS dataset, dv.version AS dataset_version,
       r.model_name AS model, r.pretrained, r.seed, r.device, r.precision, r.settings,
       r.num_samples, {done} AS done, {failed} AS failed,
       r.num_samples - ({done}) - ({failed}) AS pending,
       p.top1, p.top5, p.zeroshot_top1, p.top1_zeroshot_samples - p.zeroshot_top1 AS gain,
       p.mean_seconds, r.fingerprint, r.mlflow_run_id, r.created_at, r.started_at, r.finished_at
FROM runs r
JOIN dataset_versions dv ON dv.id = r.dataset_version_id
JOIN datasets d ON d.id = dv.dataset_id
LEFT JOIN (
    SELECT run_id, COUNT(*) AS done,
           {ratio("correct")} AS top1,
           {ratio("top5_correct")} AS top5,
           {ratio("zeroshot_correct", when_null="zeroshot_correct")} AS zeroshot_top1,
           {ratio("correct", when_null="zeroshot_correct")} AS top1_zeroshot_samples,
           CAST(AVG(seconds) AS DOUBLE PRECISION) AS mean_seconds
    FROM predictions GROUP BY run_id
) p ON p.run_id = r.id
LEFT JOIN (
    SELECT e.run_id, COUNT(*) AS failed FROM sample_errors e
    WHERE NOT EXISTS (SELECT 1 FROM predictions x WHERE x.run_id = e.run_id AND x.sample_id = e.sample_id)
    GROUP BY e.run_id
) e ON e.run_id = r.id
LEFT JOIN (
    SELECT run_id, SUM(samples_done) AS done, SUM(samples_failed) AS failed FROM shards GROUP BY run_id
) s ON s.run_id = r.id
"""


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_summary")
    op.execute(run_summary())


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_summary")
    op.execute(_trust.run_summary(with_run_columns=True))
