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


# The view as 0003 defined it: rewritten here, restored by the downgrade.
_trust = _load_0003()
_COUNTS_0003 = ("COALESCE(p.done, 0) AS done, COALESCE(e.failed, 0) AS failed,\n"
                "       r.num_samples - COALESCE(p.done, 0) - COALESCE(e.failed, 0) AS pending")
_DONE = "CASE WHEN r.kind = 'tune' THEN COALESCE(p.done, 0) ELSE COALESCE(s.done, 0) END"
_FAILED = "CASE WHEN r.kind = 'tune' THEN COALESCE(e.failed, 0) ELSE COALESCE(s.failed, 0) END"
_SHARD_COUNTS = """LEFT JOIN (
    SELECT run_id, SUM(samples_done) AS done, SUM(samples_failed) AS failed FROM shards GROUP BY run_id
) s ON s.run_id = r.id
"""


def run_summary() -> str:
    """0003's view with the counts of runs other than tuning runs read from their shards."""
    view = _trust.run_summary(with_run_columns=True)
    assert _COUNTS_0003 in view, "0003's view text changed; this migration rewrites it"
    counts = f"{_DONE} AS done, {_FAILED} AS failed,\n       r.num_samples - ({_DONE}) - ({_FAILED}) AS pending"
    return view.replace(_COUNTS_0003, counts).rstrip() + "\n" + _SHARD_COUNTS


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_summary")
    op.execute(run_summary())


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_summary")
    op.execute(_trust.run_summary(with_run_columns=True))
