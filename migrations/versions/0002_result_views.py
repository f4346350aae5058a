"""result views and covering indexes: run summary, per-class accuracy, prediction detail, run-pair comparison

Views for `difftpt-ops sql` and any SQL client. Only the JSON lookup of a class name differs between
SQLite and PostgreSQL; every view has the same columns on both.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VIEWS = ("run_pair_comparison", "prediction_detail", "run_class_accuracy", "run_summary")
# Covering indexes: `results` (with or without --by-class) and `compare` read only these columns, so the
# database answers from the index alone. Without them each query fetches its run's rows from the table,
# scattered when runs execute concurrently: ~10x slower at a million predictions (bench/query_speed.py).
INDEXES = {
    "ix_predictions_run_summary": ["run_id", "label", "correct", "top5_correct", "zeroshot_correct",
                                   "confidence_after", "seconds"],
    "ix_predictions_run_sample_correct": ["run_id", "sample_id", "correct"],
}


def _ratio(condition: str, *, when_null: str | None = None) -> str:
    """Mean of a boolean as DOUBLE PRECISION (PostgreSQL's AVG of numerics is NUMERIC; SQLite reads it as REAL)."""
    null_guard = f"WHEN {when_null} IS NULL THEN NULL " if when_null else ""
    return f"CAST(AVG(CASE {null_guard}WHEN {condition} THEN 1.0 ELSE 0.0 END) AS DOUBLE PRECISION)"


def _class_name(names: str, label: str, dialect: str) -> str:
    """The class name at index `label` of the JSON list `names`."""
    if dialect == "postgresql":
        return f"(({names})::json ->> ({label}))"
    return f"json_extract({names}, '$[' || ({label}) || ']')"


def _run_summary() -> str:
    return f"""
CREATE VIEW run_summary AS
SELECT r.id AS run_id, r.kind, r.method, r.state, d.name AS dataset, dv.version AS dataset_version,
       r.num_samples, COALESCE(p.done, 0) AS done, COALESCE(e.failed, 0) AS failed,
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


def _run_class_accuracy(dialect: str) -> str:
    return f"""
CREATE VIEW run_class_accuracy AS
SELECT p.run_id, p.label, {_class_name("d.class_names", "p.label", dialect)} AS class_name,
       p.n, p.correct, p.top1, p.zeroshot_top1, p.top1 - p.zeroshot_top1 AS gain
FROM (
    SELECT run_id, label, COUNT(*) AS n, SUM(CASE WHEN correct THEN 1 ELSE 0 END) AS correct,
           {_ratio("correct")} AS top1,
           {_ratio("zeroshot_correct", when_null="zeroshot_correct")} AS zeroshot_top1
    FROM predictions GROUP BY run_id, label
) p
JOIN runs r ON r.id = p.run_id
JOIN dataset_versions dv ON dv.id = r.dataset_version_id
JOIN datasets d ON d.id = dv.dataset_id
"""


def _prediction_detail(dialect: str) -> str:
    return f"""
CREATE VIEW prediction_detail AS
SELECT p.run_id, r.method, d.name AS dataset, dv.version AS dataset_version,
       p.sample_id, p.sample_index, s.relpath, d.root || '/' || s.relpath AS path,
       p.label, {_class_name("d.class_names", "p.label", dialect)} AS label_name,
       p.pred, {_class_name("d.class_names", "p.pred", dialect)} AS pred_name,
       p.correct, p.top5_correct, p.zeroshot_pred,
       {_class_name("d.class_names", "p.zeroshot_pred", dialect)} AS zeroshot_name, p.zeroshot_correct,
       p.confidence_before, p.confidence_after, p.entropy_before, p.entropy_after,
       p.n_views, p.n_kept, p.seconds, p.worker, p.created_at
FROM predictions p
JOIN samples s ON s.id = p.sample_id
JOIN runs r ON r.id = p.run_id
JOIN dataset_versions dv ON dv.id = r.dataset_version_id
JOIN datasets d ON d.id = dv.dataset_id
"""


def _run_pair_comparison() -> str:
    # Aggregated over the samples both runs finished; filter on run_a/run_b (both orders are present),
    # the database pushes that filter into the join, otherwise every pair of runs is compared.
    return """
CREATE VIEW run_pair_comparison AS
SELECT a.run_id AS run_a, b.run_id AS run_b, COUNT(*) AS n,
       SUM(CASE WHEN a.correct AND b.correct THEN 1 ELSE 0 END) AS both_right,
       SUM(CASE WHEN a.correct AND NOT b.correct THEN 1 ELSE 0 END) AS only_a,
       SUM(CASE WHEN b.correct AND NOT a.correct THEN 1 ELSE 0 END) AS only_b,
       SUM(CASE WHEN a.correct OR b.correct THEN 0 ELSE 1 END) AS both_wrong,
       CAST(AVG(CASE WHEN a.correct THEN 1.0 ELSE 0.0 END) AS DOUBLE PRECISION) AS top1_a,
       CAST(AVG(CASE WHEN b.correct THEN 1.0 ELSE 0.0 END) AS DOUBLE PRECISION) AS top1_b,
       CAST(AVG(CASE WHEN a.correct THEN 1.0 ELSE 0.0 END) - AVG(CASE WHEN b.correct THEN 1.0 ELSE 0.0 END)
            AS DOUBLE PRECISION) AS difference
FROM predictions a
JOIN predictions b ON b.sample_id = a.sample_id AND b.run_id <> a.run_id
GROUP BY a.run_id, b.run_id
"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.execute(_run_summary())
    op.execute(_run_class_accuracy(dialect))
    op.execute(_prediction_detail(dialect))
    op.execute(_run_pair_comparison())
    for name, columns in INDEXES.items():
        op.create_index(name, "predictions", columns)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for name in INDEXES:
        op.drop_index(name, table_name="predictions")
