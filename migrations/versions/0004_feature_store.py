"""per-view feature store: one row per stored (model, sample, view recipe) set

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "view_features",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("sample_hash", sa.String(length=64), nullable=False),
        sa.Column("recipe_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("views", sa.JSON(), nullable=False),
        sa.Column("n_views", sa.Integer(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("artifact_key", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("model_name", sa.Text(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_view_features")),
        sa.UniqueConstraint("model_fingerprint", "sample_hash", "recipe_fingerprint",
                            name=op.f("uq_view_features_model_fingerprint_sample_hash_recipe_fingerprint")),
    )
    op.create_index("ix_view_features_model_sample", "view_features", ["model_fingerprint", "sample_hash"],
                    unique=False)
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("views_encoded", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("views_read", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("views_read")
        batch.drop_column("views_encoded")
    op.drop_index("ix_view_features_model_sample", table_name="view_features")
    op.drop_table("view_features")
