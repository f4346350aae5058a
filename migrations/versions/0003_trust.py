"""trust: provenance of runs, generated-view counts per prediction, waiting shards

Runs get their model, pretrained tag, seed, device, precision and non-default method settings as plain
columns (so SQL over runs is the same on SQLite and PostgreSQL) and their provenance; shards the reason
they wait (a DiffTPT shard waits for its samples' generated images) and the provenance of the attempt
that ran them; predictions the number of generated views they used; view scores a method's own per-view
weight (MTA's inlierness, ...). `run_summary` gains the new run
columns.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_RUN_COLUMNS = {"model_name": sa.Text, "pretrained": sa.Text, "seed": sa.Integer, "device": lambda: sa.String(16),
                "precision": lambda: sa.String(8), "settings": sa.Text, "provenance": sa.JSON}
_SHARD_COLUMNS = {"waiting_reason": sa.Text, "provenance": sa.JSON}


def _ratio(condition: str, *, when_null: str | None = None) -> str:
    """Mean of a boolean as DOUBLE PRECISION (as in 0002)."""
    null_guard = f"WHEN {when_null} IS NULL THEN NULL " if when_null else ""
    return f"CAST(AVG(CASE {null_guard}WHEN {condition} THEN 1.0 ELSE 0.0 END) AS DOUBLE PRECISION)"


def run_summary(with_run_columns: bool) -> str:
    extra = ("r.model_name AS model, r.pretrained, r.seed, r.device, r.precision, r.settings, "
             if with_run_columns else "")
    return f"""
CREATE VIEW run_summary AS
SELECT r.id AS run_id, r.kind, r.method, r.state, d.name AS dataset, dv.version AS dataset_version,
       {extra}r.num_samples, COALESCE(p.done, 0) AS done, COALESCE(e.failed, 0) AS failed,
       r.num_samples - COALESCE(p.done, 0) - COALESCE(e.failed, 0) AS pending,
       p.top1, p.top5, p.zeroshot_top1, p.top1_zeroshot_samples - p.zeroshot_top1 AS gain,
       p.mean_seconds, r.fingerprint, r.mlflow_run_id, r.created_at, r.started_at, r.finished_at
FROM runs r
JOIN dataset_versions dv ON dv.id = r.dataset_version_id
JOIN datasets d ON d.id = dv.dataset_id
LEFT JOIN (
    SELECT run_id, COUNT(*) AS done,
           {_ratio("correct")} AS top1,
           {_ratio("top5_correct")} AS top5,
           {_ratio("zeroshot_correct", when_null="zeroshot_correct")} AS zeroshot_top1,
           {_ratio("correct", when_null="zeroshot_correct")} AS top1_zeroshot_samples,
           CAST(AVG(seconds) AS DOUBLE PRECISION) AS mean_seconds
    FROM predictions GROUP BY run_id
) p ON p.run_id = r.id
LEFT JOIN (
    SELECT e.run_id, COUNT(*) AS failed FROM sample_errors e
    WHERE NOT EXISTS (SELECT 1 FROM predictions x WHERE x.run_id = e.run_id AND x.sample_id = e.sample_id)
    GROUP BY e.run_id
) e ON e.run_id = r.id
"""


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_summary")
    with op.batch_alter_table("runs") as batch:
        for name, kind in _RUN_COLUMNS.items():
            batch.add_column(sa.Column(name, kind(), nullable=True))
    with op.batch_alter_table("shards") as batch:
        for name, kind in _SHARD_COLUMNS.items():
            batch.add_column(sa.Column(name, kind(), nullable=True))
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("n_generated", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("view_scores") as batch:
        batch.add_column(sa.Column("weight", sa.Float(), nullable=True))
    op.execute(run_summary(with_run_columns=True))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_summary")
    with op.batch_alter_table("view_scores") as batch:
        batch.drop_column("weight")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("n_generated")
    with op.batch_alter_table("shards") as batch:
        for name in _SHARD_COLUMNS:
            batch.drop_column(name)
    with op.batch_alter_table("runs") as batch:
        for name in _RUN_COLUMNS:
            batch.drop_column(name)
    op.execute(run_summary(with_run_columns=False))
