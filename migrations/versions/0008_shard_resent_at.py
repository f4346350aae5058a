"""shards.resent_at: when a worker's lost-message check last sent the shard again

After a Redis restart every worker's check sees the same queued shards missing from the broker. Each
check now claims the re-send by setting this column (only if no other check did within the grace
period), so one message goes out per lost shard instead of one per worker.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _load_0007():  # type: ignore[no-untyped-def]
    """The 0007 migration module, loaded from its file (version files are not an importable package)."""
    path = Path(__file__).with_name("0007_run_summary_counts.py")
    spec = importlib.util.spec_from_file_location("_difftpt_migration_0007", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    # A plain ADD COLUMN (nullable) on both SQLite and PostgreSQL: no table copy, views stay valid.
    op.add_column("shards", sa.Column("resent_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # SQLite drops a column by copying the table, which fails while a view names it: drop run_summary first.
    op.execute("DROP VIEW IF EXISTS run_summary")
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("resent_at")
    op.execute(_load_0007().run_summary())
