"""sweeps and seed groups of runs

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("num_runs", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_sweeps_fingerprint")),
    )
    op.create_table(
        "sweep_runs",
        sa.Column("sweep_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("point", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["sweep_id"], ["sweeps.id"], name=op.f("fk_sweep_runs_sweep_id_sweeps"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_sweep_runs_run_id_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sweep_id", "run_id", name=op.f("pk_sweep_runs")),
    )
    op.create_index("ix_sweep_runs_run_id", "sweep_runs", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_sweep_runs_run_id", table_name="sweep_runs")
    op.drop_table("sweep_runs")
    op.drop_table("sweeps")
